// DCF dashboard: plain ES module, no build step, no dependencies.
//
// Views are chosen by the URL hash: "#/" lists functions, "#/function/NAME" shows one.
// Everything is polled every POLL_MS from the gateway's JSON API; management calls
// carry the bearer token once the user has given one (kept in sessionStorage).

const POLL_MS = 2000;
const REQUEST_TIMEOUT_MS = 10000;
const HISTORY_POINTS = 150; // 5 minutes at one point per 2 s
const TOKEN_KEY = "dcf-token";
const LOG_TAIL = 200;
// The gateway's root, so the dashboard also works behind a proxy under a path prefix.
const BASE = location.pathname.replace(/\/ui(?:\/.*)?$/, "");
const PALETTE = ["#ff4d6d", "#4f8cff", "#2ec27e", "#f6a609", "#a55eea", "#00b8d9", "#ff7a45",
  "#8bc34a", "#e056fd", "#26a69a"];

// ---------------------------------------------------------------------------
// small DOM helpers (textContent everywhere: names, logs and bodies are user data)

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  append(el, children);
  return el;
}

const $ = (selector, root = document) => root.querySelector(selector);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------------------
// formatting

function fmtSeconds(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  const ms = seconds * 1000;
  if (ms < 10) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${ms.toFixed(ms < 100 ? 1 : 0)} ms`;
  return `${seconds.toFixed(2)} s`;
}

function fmtInt(n) {
  return (n ?? 0).toLocaleString("en-US");
}

function errorRate(errors, invocations) {
  if (!invocations) return null;
  return (errors || 0) / invocations;
}

function fmtRate(rate) {
  if (rate === null) return "—";
  if (rate === 0) return "0%";
  const pct = rate * 100;
  return `${pct < 0.1 ? "<0.1" : pct.toFixed(pct < 10 ? 1 : 0)}%`;
}

function fmtAgo(epochSeconds) {
  if (!epochSeconds) return "—";
  const s = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function fmtUptime(epochSeconds) {
  if (!epochSeconds) return "—";
  const s = Math.max(0, Math.floor(Date.now() / 1000 - epochSeconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function statusBadge(status, id) {
  const slug = String(status || "unknown").toLowerCase().replace(/[^a-z0-9]+/g, "-");
  return h("span", { class: `badge status-${slug}`, id, dataset: { status } }, status);
}

function codeClass(status) {
  if (status >= 500) return "code-5xx";
  if (status >= 400) return "code-4xx";
  return "code-2xx";
}

const REASONS = {
  200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
  401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
  422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error",
  502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
};

// ---------------------------------------------------------------------------
// API client: token, 401 → prompt, network failure → banner

const store = {
  token: sessionStorage.getItem(TOKEN_KEY) || null,
  reachable: null,
  history: new Map(), // function name → [{t, p50, p99}]
};

class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}
class Unauthorized extends ApiError {}
class Unreachable extends Error {}

async function request(path, { method = "GET", json, body, headers = {}, system = true,
  timeout = REQUEST_TIMEOUT_MS } = {}) {
  const sent = { ...headers };
  const token = store.token;
  if (system && token) sent.Authorization = `Bearer ${token}`;
  if (json !== undefined) {
    sent["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const controller = new AbortController();
  const timer = timeout ? setTimeout(() => controller.abort(), timeout) : null;
  let response;
  try {
    response = await fetch(BASE + path, { method, headers: sent, body, cache: "no-store",
      signal: controller.signal });
  } catch (err) {
    setReachable(false, err);
    throw new Unreachable(`gateway unreachable: ${err.message || err}`);
  } finally {
    if (timer) clearTimeout(timer);
  }
  setReachable(true);
  if (system && response.status === 401) {
    // Only a refusal of the token we hold now asks again (not one sent before a change).
    if (token === store.token) askToken(Boolean(token));
    throw new Unauthorized(401, "this gateway needs a token");
  }
  return response;
}

async function errorOf(response) {
  let message = `${response.status} ${REASONS[response.status] || ""}`.trim();
  let body = null;
  try {
    body = await response.json();
    if (body && body.error) message = typeof body.error === "string" ? body.error
      : JSON.stringify(body.error);
  } catch { /* not JSON */ }
  return new ApiError(response.status, message, body);
}

async function apiJSON(path, options) {
  const response = await request(path, options);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

async function apiText(path, options) {
  const response = await request(path, options);
  if (!response.ok) throw await errorOf(response);
  return response.text();
}

const api = {
  functions: () => apiJSON("/system/functions"),
  info: (name) => apiJSON(`/system/function/${encodeURIComponent(name)}`),
  gateway: () => apiJSON("/system/info"),
  logs: (name, tail = LOG_TAIL) =>
    apiText(`/system/function/${encodeURIComponent(name)}/logs?tail=${tail}`),
  scale: (name, min, max) => apiJSON(`/system/function/${encodeURIComponent(name)}/scale`,
    { method: "POST", json: { min, max } }),
  remove: (name) => apiJSON(`/system/function/${encodeURIComponent(name)}`, { method: "DELETE" }),
  invoke: (name, body, contentType) => request(`/function/${encodeURIComponent(name)}`, {
    method: "POST", body, headers: contentType ? { "Content-Type": contentType } : {},
    system: false, timeout: 0,
  }),
};

// ---------------------------------------------------------------------------
// gateway reachability banner and header state

function setReachable(ok, err) {
  if (store.reachable === ok) return;
  const wasDown = store.reachable === false;
  store.reachable = ok;
  $("#banner-unreachable").hidden = ok;
  $("#gateway-dot").className = `dot ${ok ? "dot-ok" : "dot-down"}`;
  $("#gateway-label").textContent = ok ? location.host : "unreachable";
  if (!ok) {
    $("#banner-detail").textContent =
      `${location.host} does not answer${err && err.name === "AbortError" ? " (timed out)" : ""}`
      + ` — retrying every ${POLL_MS / 1000} s.`;
  } else if (wasDown) {
    toast("Gateway is back");
    refreshGatewayLabel();
  }
}

// A replica's isolation and, in a sandbox, what it may use at most (config.yaml's words).
function isolationText(r) {
  if (!r.isolation) return "—";
  const limits = Object.entries(r.limits || {}).map(([k, v]) => `${k} ${v}`).join(" · ");
  const by = r.limits_by ? ` (by ${r.limits_by})` : "";
  return limits ? `${r.isolation}: ${limits}${by}` : r.isolation;
}

async function refreshGatewayLabel() {
  try {
    const info = await api.gateway();
    $("#gateway-label").textContent = `${location.host} · v${info.version} · ${info.backend}`
      + (info.isolation ? ` · ${info.isolation}` : "");
  } catch { /* the label stays as it is */ }
}

// ---------------------------------------------------------------------------
// token prompt

function askToken(refused) {
  const modal = $("#token-modal");
  $("#token-error").hidden = !refused;
  if (!modal.hidden) return;
  modal.hidden = false;
  const input = $("#token-input");
  input.value = "";
  setTimeout(() => input.focus(), 0);
}

function setupToken() {
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("#token-input").value.trim();
    if (!token) return;
    store.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("#token-modal").hidden = true;
    $("#token-button").hidden = false;
    refreshGatewayLabel();
    router.refreshNow();
  });
  $("#token-button").hidden = !store.token;
  $("#token-button").addEventListener("click", () => askToken(false));
}

// ---------------------------------------------------------------------------
// toasts and confirm dialog

function toast(message, kind = "info") {
  const el = h("div", { class: `toast toast-${kind}`, role: "status" }, message);
  $("#toasts").append(el);
  setTimeout(() => el.remove(), 4000);
}

function confirmDialog(title, text, okLabel = "Delete") {
  return new Promise((resolve) => {
    const modal = $("#confirm-modal");
    $("#confirm-title").textContent = title;
    $("#confirm-text").textContent = text;
    $("#confirm-ok").textContent = okLabel;
    modal.hidden = false;
    const done = (answer) => {
      modal.hidden = true;
      $("#confirm-ok").removeEventListener("click", yes);
      $("#confirm-cancel").removeEventListener("click", no);
      document.removeEventListener("keydown", key);
      resolve(answer);
    };
    const yes = () => done(true);
    const no = () => done(false);
    const key = (event) => { if (event.key === "Escape") no(); };
    $("#confirm-ok").addEventListener("click", yes);
    $("#confirm-cancel").addEventListener("click", no);
    document.addEventListener("keydown", key);
    $("#confirm-cancel").focus();
  });
}

// ---------------------------------------------------------------------------
// latency history (built client-side from polling)

function recordHistory(info) {
  if (!info || !info.latency) return;
  let points = store.history.get(info.name);
  if (!points) store.history.set(info.name, (points = []));
  const point = { t: Date.now(), p50: info.latency.p50, p99: info.latency.p99 };
  const last = points[points.length - 1];
  if (last && point.t - last.t < POLL_MS / 2) points[points.length - 1] = point;
  else points.push(point);
  if (points.length > HISTORY_POINTS) points.splice(0, points.length - HISTORY_POINTS);
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const exp = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * exp) return step * exp;
  return 10 * exp;
}

function latencyChart(points) {
  const W = 640, H = 220, L = 58, R = 12, T = 12, B = 26;
  const data = points.filter((p) => p.p50 !== null || p.p99 !== null);
  const root = svg("svg", { class: "chart", id: "latency-chart", viewBox: `0 0 ${W} ${H}`,
    role: "img", "data-points": data.length,
    "aria-label": "p50 and p99 latency over time" });
  if (data.length === 0) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis-label" },
      "No calls yet: latency appears after the first call."));
    return root;
  }
  const now = Date.now();
  const span = Math.max(30000, now - data[0].t);
  const maxMs = niceMax(Math.max(...data.map((p) => (p.p99 ?? p.p50 ?? 0) * 1000)) * 1.1);
  const x = (t) => L + ((t - (now - span)) / span) * (W - L - R);
  const y = (ms) => T + (1 - ms / maxMs) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const ms = (maxMs * i) / 4;
    root.append(svg("line", { class: "grid-line", x1: L, x2: W - R, y1: y(ms), y2: y(ms) }));
    const label = ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${+ms.toFixed(ms < 10 ? 2 : 0)} ms`;
    root.append(svg("text", { class: "axis-label", x: L - 6, y: y(ms) + 3, "text-anchor": "end" },
      label));
  }
  for (let i = 0; i <= 4; i++) {
    const t = now - span + (span * i) / 4;
    const ago = Math.round((now - t) / 1000);
    root.append(svg("text", { class: "axis-label", x: x(t), y: H - 8,
      "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" },
      ago === 0 ? "now" : `-${ago >= 120 ? `${Math.round(ago / 60)}m` : `${ago}s`}`));
  }
  const line = (key) => data.filter((p) => p[key] !== null)
    .map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p[key] * 1000).toFixed(1)}`).join("");
  const p50 = line("p50");
  if (p50) {
    const first = data.find((p) => p.p50 !== null);
    const last = [...data].reverse().find((p) => p.p50 !== null);
    root.append(svg("path", { class: "p50-area",
      d: `${p50}L${x(last.t).toFixed(1)},${y(0)}L${x(first.t).toFixed(1)},${y(0)}Z` }));
    root.append(svg("path", { class: "p50", d: p50 }));
  }
  const p99 = line("p99");
  if (p99) root.append(svg("path", { class: "p99", d: p99 }));
  const last = data[data.length - 1];
  for (const key of ["p50", "p99"]) {
    if (last[key] === null) continue;
    root.append(svg("circle", { class: `${key} dot-${key}`, cx: x(last.t), cy: y(last[key] * 1000),
      r: 3.5 }, svg("title", {}, `${key} ${fmtSeconds(last[key])}`)));
  }
  return root;
}

// ---------------------------------------------------------------------------
// the functions list

class ListView {
  constructor(root) {
    this.root = root;
    this.cards = h("div", { class: "grid grid-cards" });
    this.tbody = h("tbody");
    this.table = h("table", { id: "functions-table" },
      h("thead", {}, h("tr", {},
        h("th", {}, "Name"), h("th", {}, "Status"), h("th", { class: "num" }, "Replicas"),
        h("th", { class: "num" }, "Invocations"), h("th", { class: "num" }, "p50"),
        h("th", { class: "num" }, "p99"), h("th", { class: "num" }, "Error rate"),
        h("th", {}, "Runtime / image"), h("th", { class: "num" }, "Version"))),
      this.tbody);
    this.subtitle = h("span", { class: "muted" }, "loading…");
    root.replaceChildren(
      h("div", { class: "page-head" },
        h("div", {}, h("h1", {}, "Functions"), this.subtitle)),
      this.cards,
      h("section", { class: "panel" }, h("div", { class: "panel-body flush table-scroll" },
        this.table)),
    );
    this.tbody.append(h("tr", {}, h("td", { colspan: 9, class: "empty" }, "Loading functions…")));
  }

  async refresh() {
    const list = await api.functions();
    const infos = await Promise.all(list.map((fn) => api.info(fn.name).catch((err) => {
      if (err instanceof Unauthorized || err instanceof Unreachable) throw err;
      return null; // deleted between the two calls
    })));
    const rows = list.map((fn, i) => ({ ...fn, ...(infos[i] || {}), info: infos[i] }));
    rows.forEach((row) => row.info && recordHistory(row.info));
    this.render(rows);
  }

  render(rows) {
    const total = rows.reduce((n, r) => n + (r.invocations || 0), 0);
    const errors = rows.reduce((n, r) => n + (r.errors || 0), 0);
    const ready = rows.filter((r) => r.status === "Ready").length;
    const failed = rows.filter((r) => r.status === "Failed").length;
    this.subtitle.textContent =
      `${rows.length} function${rows.length === 1 ? "" : "s"} · live, every ${POLL_MS / 1000} s`;
    this.cards.replaceChildren(
      card("Functions", fmtInt(rows.length), `${ready} ready${failed ? ` · ${failed} failed` : ""}`),
      card("Replicas ready", fmtInt(rows.reduce((n, r) => n + (r.replicas?.ready || 0), 0)),
        `of ${fmtInt(rows.reduce((n, r) => n + (r.replicas?.desired || 0), 0))} desired`),
      card("Invocations", fmtInt(total), "all functions, all status codes"),
      card("Error rate", fmtRate(errorRate(errors, total)), `${fmtInt(errors)} server errors (5xx)`),
    );
    if (rows.length === 0) {
      this.tbody.replaceChildren(h("tr", {}, h("td", { colspan: 9, class: "empty" },
        "No functions yet. Deploy one with ", h("code", {}, "dcf function create -f config.yaml"),
        ".")));
      return;
    }
    this.tbody.replaceChildren(...rows.map((r) => {
      const href = `#/function/${encodeURIComponent(r.name)}`;
      const rate = errorRate(r.errors, r.invocations);
      return h("tr", { class: "clickable", dataset: { function: r.name, status: r.status },
        onclick: (event) => { if (!event.target.closest("a")) location.hash = href; } },
        h("td", {}, h("a", { class: "fn-link", href }, r.name)),
        h("td", { class: "status" }, statusBadge(r.status)),
        h("td", { class: "num replicas" }, `${r.replicas?.ready ?? 0}/${r.replicas?.desired ?? 0}`),
        h("td", { class: "num invocations" }, fmtInt(r.invocations)),
        h("td", { class: "num p50" }, fmtSeconds(r.latency?.p50)),
        h("td", { class: "num p99" }, fmtSeconds(r.latency?.p99)),
        h("td", { class: `num error-rate${rate > 0.05 ? " err-high" : ""}` }, fmtRate(rate)),
        h("td", { class: "muted" }, r.image ? `${r.runtime} · ${r.image}` : r.runtime),
        h("td", { class: "num muted version" }, r.version ? `v${r.version}` : "—",
          rolloutBar(r.rollout)));
    }));
  }
}

// A canary rollout on the function's row: the split of calls between the two versions
// while it runs, and how it ended (the reason, with its figures, on hover).
function rolloutBar(rollout) {
  if (!rollout) return null;
  if (rollout.state !== "running") {
    const ended = rollout.state === "promoted" ? "promoted" : "aborted";
    return h("div", { class: `rollout-note rollout-${ended}`, title: rollout.reason,
      dataset: { rollout: ended } }, `v${rollout.canary} ${ended}`);
  }
  const stable = 100 - rollout.share;
  return h("div", { class: "rollout", dataset: { rollout: "running", share: rollout.share },
      title: `canary v${rollout.canary} at ${rollout.share}% of calls (steps ${
        rollout.steps.join(", ")}%)` },
    h("div", { class: "rollout-bar" },
      h("span", { class: "rollout-stable", style: `width: ${stable}%` }),
      h("span", { class: "rollout-canary", style: `width: ${rollout.share}%` })),
    h("div", { class: "rollout-label" },
      `v${rollout.stable} ${stable}% · v${rollout.canary} ${rollout.share}%`));
}

// The rollout in progress, on the function's page: its split, its step and the figures
// of this window, which the judge compares when the interval ends.
function rolloutDetail(rollout) {
  if (!rollout || rollout.state !== "running") return null;
  const side = (label, version, w) => `${label} v${version} ${fmtInt(w.calls)} calls, `
    + `${fmtInt(w.errors)} errors, p95 ${fmtSeconds(w.p95)}`;
  const { canary, stable } = rollout.window;
  return h("div", { class: "alert alert-warn", id: "rollout" },
    h("strong", {}, `Canary v${rollout.canary} at ${rollout.share}% of calls`),
    ` · step ${rollout.step + 1} of ${rollout.steps.length} (${rollout.steps.join("% → ")}%)`,
    rolloutBar(rollout),
    h("div", { class: "rollout-window" }, `This window: ${side("canary", rollout.canary, canary)}; `
      + `${side("stable", rollout.stable, stable)}`));
}

function card(label, value, sub, id) {
  return h("div", { class: "card", id },
    h("div", { class: "card-label" }, label),
    h("div", { class: "card-value" }, value),
    sub ? h("div", { class: "card-sub" }, sub) : null);
}

// ---------------------------------------------------------------------------
// one function

function flatten(value, prefix = "", out = []) {
  if (value && typeof value === "object" && !Array.isArray(value)
      && Object.keys(value).length > 0) {
    for (const [key, inner] of Object.entries(value)) {
      flatten(inner, prefix ? `${prefix}.${key}` : key, out);
    }
  } else {
    out.push([prefix, value]);
  }
  return out;
}

function showValue(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "object") return JSON.stringify(value);
  if (value === "") return "\"\"";
  return String(value);
}

function looksLikeImageFunction(info) {
  const text = `${info.name} ${info.desc || ""} ${info.image || ""}`.toLowerCase();
  return /detect|image|vision|ssd|yolo|classif|segment|ocr|face|photo/.test(text);
}

class FunctionView {
  constructor(root, name) {
    this.root = root;
    this.name = name;
    this.info = null;
    this.lastLogs = null;
    this.scaleDirty = false;
    this.build();
  }

  build() {
    const name = this.name;
    this.statusSlot = h("span");
    this.versionSlot = h("span", { class: "muted" });
    this.alerts = h("div");
    this.cards = h("div", { class: "grid grid-cards" });
    this.chartSlot = h("div", {}, latencyChart(store.history.get(name) || []));
    this.replicasBody = h("tbody");
    this.replicaLimits = h("div", { class: "panel-body muted", id: "replica-limits" });
    this.scaleMin = h("input", { id: "scale-min", type: "number", min: 0, max: 64,
      oninput: () => { this.scaleDirty = true; } });
    this.scaleMax = h("input", { id: "scale-max", type: "number", min: 1, max: 64,
      oninput: () => { this.scaleDirty = true; } });
    this.scaleMessage = h("p", { id: "scale-message", class: "form-ok", hidden: true });
    this.logs = h("pre", { id: "logs", class: "logs" },
      h("span", { class: "empty-log" }, "loading logs…"));
    this.follow = h("input", { type: "checkbox", id: "logs-follow", checked: true });
    this.configBody = h("div");
    this.rawConfig = h("input", { type: "checkbox", id: "config-raw",
      onchange: () => this.renderConfig() });
    this.tryPanel = new TryPanel(name);
    this.scrolledOnce = false;

    this.root.replaceChildren(
      h("section", { id: "function-view", dataset: { function: name } },
        h("div", { class: "crumbs" }, h("a", { href: "#/" }, "Functions"), " / ", name),
        h("div", { class: "page-head" },
          h("h1", { id: "function-name" }, name), this.statusSlot, this.versionSlot,
          h("span", { class: "spacer" }),
          h("button", { class: "btn btn-danger", id: "delete-button", type: "button",
            onclick: () => this.remove() }, "Delete")),
        this.alerts,
        this.cards,
        h("div", { class: "grid grid-2" },
          h("section", { class: "panel" },
            h("div", { class: "panel-head" }, h("h2", {}, "Latency"), h("span", { class: "spacer" }),
              h("div", { class: "legend" }, h("span", { class: "l-p50" }, "p50"),
                h("span", { class: "l-p99" }, "p99"))),
            h("div", { class: "panel-body" }, this.chartSlot)),
          h("section", { class: "panel" },
            h("div", { class: "panel-head" }, h("h2", {}, "Replicas")),
            h("div", { class: "panel-body" },
              h("form", { class: "inline-form", id: "scale-form",
                onsubmit: (event) => { event.preventDefault(); this.scale(); } },
                h("label", { class: "field" }, h("span", {}, "Min replicas"), this.scaleMin),
                h("label", { class: "field" }, h("span", {}, "Max replicas"), this.scaleMax),
                h("button", { class: "btn btn-primary", id: "scale-apply", type: "submit" }, "Scale")),
              this.scaleMessage),
            h("div", { class: "panel-body flush table-scroll" },
              h("table", { id: "replicas-table" }, h("thead", {}, h("tr", {},
                h("th", {}, "Replica"), h("th", {}, "State"), h("th", {}, "Node"),
                h("th", { class: "num" }, "In flight"),
                h("th", { class: "num" }, "Served"), h("th", { class: "num" }, "PID"),
                h("th", { class: "num" }, "Uptime"), h("th", {}, "Isolation"))),
                this.replicasBody)),
            this.replicaLimits)),
        this.tryPanel.element,
        h("section", { class: "panel" },
          h("div", { class: "panel-head" }, h("h2", {}, "Logs"),
            h("span", { class: "muted" }, `last ${LOG_TAIL} lines`), h("span", { class: "spacer" }),
            h("label", { class: "switch" }, this.follow, "auto-refresh")),
          this.logs),
        h("section", { class: "panel" },
          h("div", { class: "panel-head" }, h("h2", {}, "Configuration"),
            h("span", { class: "spacer" }),
            h("label", { class: "switch" }, this.rawConfig, "raw JSON")),
          h("div", { class: "panel-body flush", id: "config" }, this.configBody))));
  }

  async refresh() {
    let info;
    try {
      info = await api.info(this.name);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        this.notFound();
        return;
      }
      throw err;
    }
    if (this.missing) {
      // It exists (again): back to the full page.
      this.missing = false;
      this.info = null;
      this.lastLogs = null;
      this.build();
    }
    const first = this.info === null;
    this.info = info;
    recordHistory(info);
    this.render(first);
    if (first || this.follow.checked) await this.refreshLogs();
  }

  notFound() {
    if (this.missing) return;
    this.missing = true;
    this.root.replaceChildren(h("div", { class: "panel", id: "function-missing" },
      h("div", { class: "empty" }, h("h2", {}, `No function named “${this.name}”`),
        h("p", {}, "It may have been deleted. ", h("a", { href: "#/" }, "Back to all functions")))));
  }

  render(first) {
    const info = this.info;
    const rep = info.replicas;
    this.statusSlot.replaceChildren(statusBadge(info.status, "status-badge"));
    this.versionSlot.textContent = (info.version
      ? `version ${info.version}${info.updating ? " (updating…)" : ""}`
        + ` · deployed ${fmtAgo(info.updated_at)}`
      : "no version running") + (info.desc ? ` · ${info.desc}` : "");
    const alerts = [];
    if (info.failure) {
      alerts.push(h("div", { class: "alert alert-error", id: "failure" },
        h("strong", {}, "Failed: "), "the function could not start.", h("pre", {}, info.failure)));
    }
    if (info.last_error) {
      alerts.push(h("div", { class: "alert alert-warn", id: "last-error" },
        h("strong", {}, "Last deploy error"), h("pre", {}, info.last_error)));
    }
    const rollout = rolloutDetail(info.rollout);
    if (rollout) alerts.push(rollout);
    this.alerts.replaceChildren(...alerts);
    const rate = errorRate(info.errors, info.invocations);
    this.cards.replaceChildren(
      card("Invocations", fmtInt(info.invocations), "all status codes", "card-invocations"),
      card("Error rate", fmtRate(rate), `${fmtInt(info.errors)} server errors (5xx)`, "card-errors"),
      card("Latency p50", fmtSeconds(info.latency?.p50), "gateway included", "card-p50"),
      card("Latency p99", fmtSeconds(info.latency?.p99), "gateway included", "card-p99"),
      card("Replicas", `${rep.ready}/${rep.desired}`,
        `min ${rep.min} · max ${rep.max}${rep.restarts ? ` · ${rep.restarts} restarts` : ""}`,
        "card-replicas"),
      card("In flight", fmtInt(info.inflight), `${fmtInt(info.queued)} queued`, "card-inflight"),
    );
    this.chartSlot.replaceChildren(latencyChart(store.history.get(this.name) || []));
    this.replicasBody.replaceChildren(...(rep.list.length ? rep.list.map((r) =>
      h("tr", { dataset: { replica: r.id, state: r.state } },
        h("td", { class: "mono" }, r.id),
        h("td", {}, h("span", { class: `badge status-${r.state === "ready" ? "ready"
          : r.state === "starting" ? "building" : "not-ready"}`, title: r.detail || "" }, r.state)),
        h("td", { class: "mono", title: [r.node, r.address].filter(Boolean).join(" ") },
          r.node_ip ? `${r.node_ip} · ${r.node.slice(0, 8)}` : (r.node ?? "—")),
        h("td", { class: "num" }, r.inflight), h("td", { class: "num" }, fmtInt(r.served)),
        h("td", { class: "num mono" }, r.pid ?? "—"),
        h("td", { class: "num" }, fmtUptime(r.started_at)),
        h("td", { class: "isolation", title: isolationText(r) }, r.isolation ?? "—")))
      : [h("tr", {}, h("td", { colspan: 8, class: "empty" },
        info.status === "Scaled to zero" ? "Scaled to zero: the next call starts a replica."
          : "No replicas running."))]));
    // Each different set of limits once (the replicas of a version share theirs).
    const limits = [...new Set(rep.list.filter((r) => r.limits).map(isolationText))];
    this.replicaLimits.replaceChildren(...limits.map((text) => h("div", {}, text)));
    this.replicaLimits.hidden = !limits.length;
    const editing = [this.scaleMin, this.scaleMax].includes(document.activeElement);
    if (first || (!this.scaleDirty && !editing)) {
      this.scaleMin.value = rep.min;
      this.scaleMax.value = rep.max;
    }
    if (first) {
      this.renderConfig();
      this.tryPanel.setMode(looksLikeImageFunction(info) ? "image" : "text");
    }
  }

  renderConfig() {
    const spec = this.info?.spec || {};
    if (this.rawConfig.checked) {
      this.configBody.replaceChildren(h("div", { class: "panel-body" },
        h("pre", { class: "json", id: "config-json" }, JSON.stringify(spec, null, 2))));
      return;
    }
    const extra = [["created", new Date(this.info.created_at * 1000).toLocaleString()],
      ["updated", new Date(this.info.updated_at * 1000).toLocaleString()]];
    this.configBody.replaceChildren(h("dl", { class: "kv-grid", id: "config-table" },
      [...flatten(spec), ...extra].map(([key, value]) =>
        h("div", { class: "kv-item", dataset: { key } }, h("dt", {}, key),
          // The gateway sends environment names only: their values may be secrets.
          h("dd", { class: "mono", title: key.startsWith("environment.")
            ? "value hidden by the gateway" : null }, showValue(value))))));
  }

  async refreshLogs() {
    let text;
    try {
      text = await api.logs(this.name);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) return;
      throw err;
    }
    if (text === this.lastLogs) return;
    this.lastLogs = text;
    const atBottom = this.logs.scrollHeight - this.logs.scrollTop - this.logs.clientHeight < 30;
    const lines = text.split("\n").filter((line) => line.length);
    if (!lines.length) {
      this.logs.replaceChildren(h("span", { class: "empty-log" }, "no log lines yet"));
      return;
    }
    this.logs.replaceChildren(...lines.map((line) => {
      const match = /^(\S+Z) \[([^\]]+)\] ?(.*)$/.exec(line);
      if (!match) return h("div", { class: "line" }, line);
      const [, stamp, source, message] = match;
      const srcClass = source === "build" || source === "gateway" ? ` src-${source}` : "";
      const bad = /error|traceback|failed|exception/i.test(message);
      return h("div", { class: "line" },
        h("span", { class: "ts" }, stamp.replace("T", " ").replace("Z", "")), " ",
        h("span", { class: `src${srcClass}` }, `[${source}]`), " ",
        h("span", { class: bad ? "err" : "" }, message));
    }));
    if (atBottom || !this.scrolledOnce) {
      this.logs.scrollTop = this.logs.scrollHeight;
      this.scrolledOnce = true;
    }
  }

  async scale() {
    const min = Number.parseInt(this.scaleMin.value, 10);
    const max = Number.parseInt(this.scaleMax.value, 10);
    const msg = this.scaleMessage;
    msg.hidden = false;
    if (Number.isNaN(min) || Number.isNaN(max)) {
      msg.className = "form-error";
      msg.textContent = "Enter whole numbers for min and max.";
      return;
    }
    $("#scale-apply").disabled = true;
    try {
      this.info = await api.scale(this.name, min, max);
      this.scaleDirty = false;
      msg.className = "form-ok";
      msg.textContent = `Scaled: min ${this.info.replicas.min}, max ${this.info.replicas.max}.`;
      this.render(false);
    } catch (err) {
      msg.className = "form-error";
      msg.textContent = err instanceof Unauthorized ? "A token is needed; enter it and retry."
        : `Could not scale: ${err.message}`;
    } finally {
      $("#scale-apply").disabled = false;
    }
  }

  async remove() {
    const ok = await confirmDialog(`Delete ${this.name}?`,
      `This stops every replica of “${this.name}” and removes its code, logs and counters. `
      + "It cannot be undone.");
    if (!ok) return;
    try {
      await api.remove(this.name);
      toast(`Deleted ${this.name}`);
      store.history.delete(this.name);
      location.hash = "#/";
    } catch (err) {
      toast(`Could not delete ${this.name}: ${err.message}`, "error");
    }
  }
}

// ---------------------------------------------------------------------------
// try-it panel: text or an image; draws detections when the answer is a list of boxes

function isDetectionList(value) {
  return Array.isArray(value) && value.every((d) => d && typeof d === "object"
    && ["xmin", "ymin", "xmax", "ymax"].every((k) => typeof d[k] === "number"));
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this image"));
    img.src = src;
  });
}

class TryPanel {
  constructor(name) {
    this.name = name;
    this.mode = "text";
    this.file = null;
    this.dataURL = null;
    this.picked = Promise.resolve();
    this.build();
  }

  build() {
    this.tabText = h("button", { class: "tab", id: "try-tab-text", type: "button", role: "tab",
      onclick: () => this.setMode("text") }, "Text");
    this.tabImage = h("button", { class: "tab", id: "try-tab-image", type: "button", role: "tab",
      onclick: () => this.setMode("image") }, "Image");
    this.input = h("textarea", { id: "try-input", placeholder: "Request body, sent as is",
      spellcheck: "false" });
    this.contentType = h("select", { id: "try-content-type" },
      ["text/plain", "application/json", "application/octet-stream"].map((t) =>
        h("option", { value: t }, t)));
    this.textPane = h("div", { id: "try-text-pane" }, this.input,
      h("div", { class: "try-actions" },
        h("label", { class: "field" }, h("span", {}, "Content-Type"), this.contentType)));

    this.fileInput = h("input", { id: "try-file", type: "file", accept: "image/*", hidden: true,
      onchange: () => {
        const file = this.fileInput.files[0];
        this.fileInput.value = ""; // choosing the same file again still fires "change"
        if (file) this.pick(file);
      } });
    this.fileName = h("div", { class: "file-name" });
    this.thumb = h("img", { class: "thumb", alt: "", hidden: true });
    this.drop = h("div", { class: "dropzone", id: "try-dropzone", tabindex: 0, role: "button",
      onclick: () => this.fileInput.click(),
      onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") this.fileInput.click(); },
      ondragover: (e) => { e.preventDefault(); this.drop.classList.add("dragover"); },
      ondragleave: () => this.drop.classList.remove("dragover"),
      ondrop: (e) => {
        e.preventDefault();
        this.drop.classList.remove("dragover");
        const file = e.dataTransfer?.files?.[0];
        if (file) this.pick(file);
      } },
    h("div", {}, h("strong", {}, "Drop a picture here"), " or click to choose one"),
    h("div", { class: "muted" }, "It is sent base64-encoded, as the SSD example expects."),
    this.fileName, this.thumb);
    this.encoding = h("select", { id: "try-encoding" },
      h("option", { value: "base64" }, "base64 text"),
      h("option", { value: "raw" }, "raw bytes"));
    this.imagePane = h("div", { id: "try-image-pane", hidden: true }, this.fileInput, this.drop,
      h("div", { class: "try-actions" },
        h("label", { class: "field" }, h("span", {}, "Send as"), this.encoding)));

    this.send = h("button", { class: "btn btn-primary", id: "try-send", type: "button",
      onclick: () => this.invoke() }, "Send");
    this.result = h("div", { id: "try-result", dataset: { state: "idle" } },
      h("div", { class: "result-placeholder" }, "The answer appears here."));

    this.element = h("section", { class: "panel", id: "try-it" },
      h("div", { class: "panel-head" }, h("h2", {}, "Try it"),
        h("span", { class: "muted mono" }, `POST /function/${this.name}`),
        h("span", { class: "spacer" }),
        h("div", { class: "tabs", role: "tablist" }, this.tabText, this.tabImage)),
      h("div", { class: "panel-body try-grid" },
        h("div", {}, this.textPane, this.imagePane,
          h("div", { class: "try-actions" }, this.send)),
        this.result));
    this.setMode("text");
  }

  setMode(mode) {
    this.mode = mode;
    this.tabText.setAttribute("aria-selected", String(mode === "text"));
    this.tabImage.setAttribute("aria-selected", String(mode === "image"));
    this.textPane.hidden = mode !== "text";
    this.imagePane.hidden = mode !== "image";
  }

  pick(file) {
    // Sending waits for this, so a call never goes out with the previous picture.
    this.picked = (async () => {
      const url = await readAsDataURL(file);
      this.file = file;
      this.dataURL = url;
      this.fileName.textContent = `${file.name} · ${(file.size / 1024).toFixed(1)} KB`;
      this.thumb.src = url;
      this.thumb.hidden = false;
      this.setMode("image");
    })().catch((err) => this.showMessage(`Cannot read ${file.name}: ${err}`));
    return this.picked;
  }

  async invoke() {
    let body, contentType;
    if (this.mode === "image") {
      await this.picked;
      if (!this.file) {
        this.showMessage("Choose a picture first.");
        return;
      }
      if (this.encoding.value === "raw") {
        body = this.file;
        contentType = this.file.type || "application/octet-stream";
      } else {
        body = this.dataURL.slice(this.dataURL.indexOf(",") + 1);
        contentType = "text/plain";
      }
    } else {
      body = this.input.value;
      contentType = this.contentType.value;
    }
    this.send.disabled = true;
    this.result.dataset.state = "pending";
    this.result.replaceChildren(h("div", { class: "result-placeholder" }, "Calling…"));
    const started = performance.now();
    try {
      const response = await api.invoke(this.name, body, contentType);
      const bytes = await response.arrayBuffer();
      await this.show(response, bytes, performance.now() - started);
    } catch (err) {
      this.showMessage(err instanceof Unreachable ? "The gateway is unreachable." : String(err));
    } finally {
      this.send.disabled = false;
    }
  }

  showMessage(text) {
    this.result.dataset.state = "error";
    this.result.replaceChildren(h("p", { class: "form-error", id: "try-error" }, text));
  }

  async show(response, bytes, ms) {
    const type = response.headers.get("content-type") || "";
    const status = response.status;
    const head = h("div", { class: "result-head" },
      h("span", { class: `badge ${codeClass(status)}`, id: "try-status",
        dataset: { status: String(status) } }, `${status} ${REASONS[status] || ""}`.trim()),
      h("span", { class: "muted", id: "try-time" }, `${ms.toFixed(0)} ms`),
      h("span", { class: "muted mono" }, type || "no content-type"),
      h("span", { class: "muted" }, `${(bytes.byteLength / 1024).toFixed(1)} KB`));
    const parts = [head];
    if (type.startsWith("image/")) {
      const url = URL.createObjectURL(new Blob([bytes], { type }));
      parts.push(h("img", { class: "result-image", id: "try-image-result", src: url,
        alt: "the function's answer" }));
    } else {
      const text = new TextDecoder().decode(bytes);
      let json;
      let isJSON = false;
      if (type.includes("json") || /^\s*[[{]/.test(text)) {
        try {
          json = JSON.parse(text);
          isJSON = true;
        } catch { /* shown as text */ }
      }
      if (isJSON && this.mode === "image" && this.dataURL && isDetectionList(json)) {
        parts.push(await this.detectionsView(json));
      }
      parts.push(h("pre", { class: isJSON ? "json" : "body", id: "try-body" },
        isJSON ? JSON.stringify(json, null, 2) : text || "(empty body)"));
    }
    this.result.replaceChildren(...parts);
    this.result.dataset.state = "done";
  }

  async detectionsView(detections) {
    const img = await loadImage(this.dataURL);
    const canvas = h("canvas", { id: "detection-canvas", width: img.naturalWidth,
      height: img.naturalHeight });
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const scale = Math.max(1, Math.max(img.naturalWidth, img.naturalHeight) / 400);
    const font = Math.round(13 * scale);
    ctx.font = `600 ${font}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    const items = detections.map((d, i) => {
      const color = PALETTE[(Number.isInteger(d.class_id) ? d.class_id : i) % PALETTE.length];
      const label = `${d.class ?? d.class_id ?? "object"} ${Number(d.confidence ?? 0).toFixed(2)}`;
      const w = d.xmax - d.xmin;
      const hgt = d.ymax - d.ymin;
      ctx.lineWidth = Math.max(2, Math.round(2 * scale));
      ctx.strokeStyle = color;
      ctx.strokeRect(d.xmin, d.ymin, w, hgt);
      const tw = ctx.measureText(label).width + 8 * scale;
      const th = font + 6 * scale;
      const ty = d.ymin - th >= 0 ? d.ymin - th : d.ymin;
      ctx.fillStyle = color;
      ctx.fillRect(d.xmin - ctx.lineWidth / 2, ty, tw, th);
      ctx.fillStyle = "#fff";
      ctx.fillText(label, d.xmin + 4 * scale - ctx.lineWidth / 2, ty + 3 * scale);
      return h("li", { style: `background:${color}`, dataset: {
        class: String(d.class ?? d.class_id ?? ""), classId: String(d.class_id ?? ""),
        confidence: String(d.confidence), label,
        box: [d.xmin, d.ymin, d.xmax, d.ymax].join(",") } }, label);
    });
    canvas.dataset.boxCount = String(detections.length);
    return h("div", { id: "detection-view" }, canvas,
      h("ul", { id: "detections", class: "detections", dataset: { count: detections.length } },
        items.length ? items : h("li", { class: "muted", style: "color:inherit" }, "no detections")));
  }
}

// ---------------------------------------------------------------------------
// router and polling

const router = {
  view: null,
  generation: 0,
  timer: null,

  start() {
    window.addEventListener("hashchange", () => this.go());
    this.go();
  },

  go() {
    const hash = location.hash || "#/";
    const match = /^#\/function\/(.+)$/.exec(hash);
    const main = $("#view");
    for (const link of document.querySelectorAll("[data-nav]")) {
      link.classList.toggle("active", !match);
    }
    this.view = match ? new FunctionView(main, decodeURIComponent(match[1])) : new ListView(main);
    document.title = match ? `${decodeURIComponent(match[1])} · DCF` : "Functions · DCF";
    this.refreshNow();
  },

  refreshNow() {
    clearTimeout(this.timer);
    const generation = ++this.generation;
    this.tick(generation);
  },

  async tick(generation) {
    const view = this.view;
    try {
      await view.refresh();
    } catch (err) {
      if (!(err instanceof Unreachable || err instanceof Unauthorized)) {
        console.error(err);
      }
    }
    if (generation !== this.generation) return;
    this.timer = setTimeout(() => this.tick(generation), POLL_MS);
  },
};

setupToken();
refreshGatewayLabel();
router.start();

// Exposed for debugging in the browser console.
window.dcf = { store, api, router, sleep };
