// The Heimdall Training dashboard: plain JavaScript over the REST api and the WebSocket hub.
"use strict";

const API = "/api/v1/training";
const COMMANDS = ["pause", "resume", "cancel"];
const $ = (id) => document.getElementById(id);
const state = {
  jobs: [], selected: null, job: null, metrics: new Map(), step: null, socket: null,
  metricFields: [], // [name, description] of MetricRow, from the api's own schema
};

/** The api token: `?token=` in the page URL (then remembered) or localStorage. */
function authToken() {
  const fromUrl = new URLSearchParams(location.search).get("token");
  if (fromUrl) localStorage.setItem("heimdall_token", fromUrl);
  return fromUrl || localStorage.getItem("heimdall_token");
}

class ApiError extends Error {
  constructor(status, body) {
    super(describe(status, body));
    this.status = status;
    this.body = body;
  }
}

function authHeaders() {
  const token = authToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (options.json !== undefined) headers["Content-Type"] = "application/json";
  const body = options.json === undefined ? undefined : JSON.stringify(options.json);
  const response = await fetch(API + path, { method: options.method || "GET", headers, body });
  const reply = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, reply);
  return reply;
}

function socketUrl(path, after) {
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (after !== null) url.searchParams.set("after", after);
  const token = authToken();
  if (token) url.searchParams.set("token", token);
  return url.href;
}

/** `422: config.epochs: Input should be ...` from the api's `{"detail": ...}`. */
function describe(status, body) {
  const detail = body && body.detail;
  if (Array.isArray(detail)) {
    return `${status}: ` + detail.map((e) => `${fieldPath(e.loc)}: ${e.msg}`).join("; ");
  }
  const current = body && body.status ? ` (job is ${body.status})` : "";
  const hint = status === 401 ? " (open this page with ?token=YOUR_KEY)" : "";
  return `${status}: ${detail || "request failed"}${current}${hint}`;
}

const fieldPath = (loc) => (loc || []).filter((part) => part !== "body").join(".");

/** A WebSocket that reconnects by itself, resuming with `?after=` the last position seen. */
class LiveSocket {
  constructor(path, onMessage, onState = () => {}) {
    Object.assign(this, { path, onMessage, onState, after: null, stopped: false, delay: 500 });
    this.open();
  }

  open() {
    const ws = new WebSocket(socketUrl(this.path, this.after));
    this.ws = ws;
    ws.onopen = () => {
      this.delay = 500;
      this.onState(true);
      this.pinger = setInterval(() => ws.send(JSON.stringify({ event: "ping" })), 20000);
    };
    ws.onmessage = (message) => this.receive(message.data);
    ws.onclose = (event) => {
      clearInterval(this.pinger);
      // 1000: the job ended (the server closes after its terminal event); 4xxx: the server
      // refused this request (unknown job, bad query, no key). Retrying helps neither.
      if (event.code === 1000 || (event.code >= 4000 && event.code < 5000)) this.stopped = true;
      this.onState(false, event.reason);
      if (this.stopped) return;
      setTimeout(() => this.stopped || this.open(), this.delay);
      this.delay = Math.min(this.delay * 2, 5000);
    };
  }

  receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    // Stored events carry positions; telemetry (`training_step`) is not stored and has none.
    if (Number.isInteger(message.position) && message.position > 0) {
      if (this.after !== null && message.position <= this.after) return;
      this.after = message.position;
    }
    this.onMessage(message);
  }

  /** Stop for good: the job ended (the server closes after a terminal event) or was left. */
  stop() {
    this.stopped = true;
    this.ws.close();
  }
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

const fmt = (value, digits = 4) => (value === null || value === undefined ? "–" : Number(value).toPrecision(digits));
/** A rate for people: 0.76 stays 0.76, 59.05 is 59.1, 1234.5 is 1235. */
const rate = (value) => String(value >= 100 ? Math.round(value) : Number(Number(value).toPrecision(3)));

/** The date and, below it, the time (local), with the exact moment on hover. */
function whenCell(iso) {
  const td = cell("", "created");
  const moment = new Date(iso);
  const date = document.createElement("span");
  date.textContent = moment.toLocaleDateString();
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = moment.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  td.append(date, time);
  td.title = moment.toString();
  return td;
}

function cell(text, className = "") {
  const td = document.createElement("td");
  td.textContent = text;
  td.className = className;
  return td;
}

function badge(element, status) {
  element.textContent = status;
  element.className = `status ${status}`;
}

// ---- job list ----

async function loadJobs() {
  try {
    state.jobs = (await api("/jobs?limit=100")).jobs;
    $("list-error").textContent = "";
    renderJobs();
  } catch (error) {
    $("list-error").textContent = `Could not load jobs: ${error.message}`;
  }
}
const reloadJobs = debounce(loadJobs, 200);

function renderJobs() {
  $("jobs-body").replaceChildren(...state.jobs.map(jobRow));
}

function jobRow(job) {
  const tr = document.createElement("tr");
  tr.dataset.id = job.id;
  tr.classList.toggle("selected", job.id === state.selected);
  const status = document.createElement("span");
  badge(status, job.status);
  const statusCell = cell("");
  statusCell.append(status);
  tr.append(
    cell(job.job_name, "name"),
    statusCell,
    cell(`${job.current_epoch}/${job.total_epochs}`),
    cell(fmt(job.val_loss)),
    whenCell(job.created_at),
  );
  tr.title = job.id;
  tr.addEventListener("click", () => select(job.id));
  return tr;
}

function onFeed(message) {
  if (message.event === "connected" || (message.job_id && message.event !== "training_step")) {
    reloadJobs();
  }
}

function setLive(on, reason = "") {
  $("live").textContent = on ? "live" : reason ? `disconnected: ${reason}` : "reconnecting…";
  $("live").classList.toggle("on", on);
}

// ---- submit ----

function formConfig(form) {
  const raw = form.elements.extra.value.trim();
  const extra = raw ? JSON.parse(raw) : {};
  if (extra === null || typeof extra !== "object" || Array.isArray(extra)) throw new Error();
  const config = { ...extra };
  for (const input of form.querySelectorAll("[data-config]")) {
    const value = input.value.trim();
    if (value === "") continue;
    const number = Number(value);
    // Anything that is not a finite number goes as typed: the api names the field it refuses.
    config[input.name] = input.dataset.config === "number" && Number.isFinite(number) ? number : value;
  }
  return config;
}

async function submitJob(event) {
  event.preventDefault();
  const form = event.target;
  const result = $("submit-result");
  form.querySelectorAll(".invalid").forEach((input) => input.classList.remove("invalid"));
  let config;
  try {
    config = formConfig(form);
  } catch {
    form.elements.extra.classList.add("invalid");
    return showResult(result, "More config: not a JSON object", false);
  }
  try {
    const job = await api("/jobs", { method: "POST", json: { job_name: form.elements.job_name.value.trim(), config } });
    const warned = (job.warnings || []).map((w) => `\nWarning: ${w}`).join("");
    showResult(result, `Submitted ${job.job_name} (${job.status})${warned}`, true);
    await loadJobs();
    select(job.id);
  } catch (error) {
    markInvalid(form, error);
    showResult(result, error.message, false);
  }
}

function markInvalid(form, error) {
  const detail = error.body && error.body.detail;
  for (const problem of Array.isArray(detail) ? detail : []) {
    const loc = (problem.loc || []).filter((part) => part !== "body" && part !== "config");
    const input = form.elements[loc[0]] || (problem.loc || []).includes("config") && form.elements.extra;
    if (input) input.classList.add("invalid");
  }
}

function showResult(element, text, ok) {
  element.textContent = text;
  element.className = `message ${ok ? "ok" : "error"}`;
}

// ---- the chosen job ----

async function select(id) {
  if (state.socket) state.socket.stop();
  Object.assign(state, { selected: id, job: null, metrics: new Map(), step: null });
  history.replaceState(null, "", `${location.search}#job=${id}`);
  $("detail").hidden = false;
  $("d-message").textContent = "";
  renderJobs();
  // Subscribe first, then read: what happens in between arrives on the socket, keyed by epoch.
  state.socket = new LiveSocket(`/ws/training/${id}`, onJobEvent);
  await Promise.all([loadJob(id), loadMetrics(id)]);
}

async function loadJob(id) {
  try {
    showJob((await api(`/jobs/${id}`)).job);
  } catch (error) {
    if (id === state.selected) showResult($("d-message"), error.message, false);
  }
}
const reloadJob = debounce(() => state.selected && loadJob(state.selected), 150);

async function loadMetrics(id) {
  const rows = await api(`/jobs/${id}/metrics`).catch(() => []);
  if (id !== state.selected) return;
  rows.forEach((row) => state.metrics.set(row.epoch, row));
  drawCharts();
}

function showJob(job) {
  if (job.id !== state.selected || (state.job && job.version < state.job.version)) return;
  state.job = job;
  if (job.status !== "running") state.step = null;
  $("d-name").textContent = job.job_name;
  badge($("d-status"), job.status);
  const best = job.best_epoch ? ` · best val loss ${fmt(job.best_val_loss)} at epoch ${job.best_epoch}` : "";
  const failure = job.error_message ? ` · ${job.error_message}` : "";
  const waiting = job.waiting ? ` · ${job.waiting}` : "";  // why a queued job has not started
  $("d-summary").textContent = `${job.model_architecture} · attempt ${job.attempt}${best}${failure}${waiting}`;
  // What the domain allows in this status, as the api says: no rules of our own here.
  for (const verb of COMMANDS) $(verb).disabled = !(job.allowed_commands || []).includes(verb);
  $("downloads").hidden = job.status !== "completed";
  $("download-model").href = `${API}/jobs/${job.id}/model`;
  $("download-export").href = `${API}/jobs/${job.id}/export`;
  showParent(job.config && job.config.init_from);
  renderProgress();
}

/** The job this one continues from (`config.init_from`), as a link that selects it. */
function showParent(parentId) {
  $("d-parent").hidden = !parentId;
  if (!parentId) return;
  const link = $("d-parent-link");
  const known = state.jobs.find((job) => job.id === parentId);
  link.dataset.id = parentId;
  link.href = `#job=${parentId}`;
  link.textContent = known ? `${known.job_name} (${parentId.slice(0, 8)})` : parentId;
}

function onJobEvent(message) {
  if (message.job_id && message.job_id !== state.selected) return;
  if (message.event === "training_status") return showJob(message);
  if (message.event === "training_step") {
    state.step = message.data;
    return renderProgress();
  }
  if (message.event === "training_progress") {
    const metrics = message.data.metrics || message.data;
    state.metrics.set(metrics.epoch, metrics);
    drawCharts();
  }
  // Every stored event carries the status the domain computed after it: show it at once.
  // What a new status allows arrives with the job's reload below; until then, nothing.
  if (message.status && state.job && Number.isInteger(message.position)) {
    const allowed = message.status === state.job.status ? state.job.allowed_commands : [];
    showJob({ ...state.job, status: message.status, allowed_commands: allowed });
  }
  if (String(message.event).startsWith("training_")) reloadJob();
}

function renderProgress() {
  const job = state.job;
  if (!job) return;
  const step = state.step;
  const total = Math.max(job.total_epochs, 1);
  let done = job.current_epoch / total;
  let text = `Epoch ${job.current_epoch} of ${job.total_epochs} (${job.progress_percent}%) · ${job.status}`;
  if (step && step.steps_per_epoch) {
    done = (step.epoch - 1 + step.step / step.steps_per_epoch) / total;
    const speed = step.samples_per_second ? ` · ${rate(step.samples_per_second)} samples/s` : "";
    const eta = Number.isFinite(step.eta_seconds) ? ` · ETA ${duration(step.eta_seconds)}` : "";
    text = `Epoch ${step.epoch} of ${job.total_epochs} · step ${step.step} of ${step.steps_per_epoch} · loss ${fmt(step.loss)}${speed}${eta}`;
  }
  $("d-bar").value = Math.min(Math.max(done, 0), 1);
  $("d-progress").textContent = text;
}

function duration(seconds) {
  const s = Math.round(seconds);
  return s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

async function command(verb) {
  if (!state.selected) return;
  try {
    const result = await api(`/jobs/${state.selected}/${verb}`, { method: "POST" });
    showResult($("d-message"), `${new Date().toLocaleTimeString()} ${result.message}`, true);
    showJob(result);
  } catch (error) {
    showResult($("d-message"), `${new Date().toLocaleTimeString()} could not ${verb}: ${error.message}`, false);
  }
}

/** Fetch a file of the chosen job with the key in the header (never in a URL), then save it. */
async function download(what) {
  const job = state.job;
  if (!job) return;
  try {
    const response = await fetch(`${API}/jobs/${job.id}/${what}`, { headers: authHeaders() });
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
    const named = (response.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
    saveBlob(await response.blob(), named ? named[1] : `${job.id}.${what === "model" ? "pt" : "heimdall"}`);
  } catch (error) {
    showResult($("d-message"), `${new Date().toLocaleTimeString()} could not download the ${what}: ${error.message}`, false);
  }
}

function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// ---- charts (plotly.js, served by the api from the plotly package) ----

function drawCharts() {
  const rows = [...state.metrics.values()].sort((a, b) => a.epoch - b.epoch);
  const x = rows.map((row) => row.epoch);
  const line = (key, name, dash = "solid") => ({
    x, y: rows.map((row) => row[key] ?? null), name, mode: "lines+markers", line: { dash },
  });
  const epochs = Math.max(x.at(-1) || 1, 1);
  plot("chart-loss", "Loss", epochs, [line("train_loss", "train"), line("val_loss", "val")]);
  plot("chart-lr", "Learning rate", epochs, [line("learning_rate", "learning rate")]);
  plot("chart-distance", "Distance error, validation (m)", epochs, [
    line("val_distance_p50_m", "p50"), line("val_distance_p68_m", "p68", "dash"),
    line("val_distance_p95_m", "p95", "dot"),
  ]);
  renderMetricTable();
}

/** The last epoch's row: every field the api declares for a metrics row, in its order. */
function renderMetricTable() {
  const rows = [...state.metrics.values()].sort((a, b) => a.epoch - b.epoch);
  const last = rows.at(-1);
  const body = $("d-metrics-body");
  body.replaceChildren();
  if (!last) return;
  for (const [name, description] of state.metricFields) {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = name;
    th.title = description;
    const value = last[name];
    const shown = Number.isInteger(value) ? String(value) : typeof value === "number" ? fmt(value, 5) : value;
    tr.append(th, cell(shown ?? "–"));
    body.append(tr);
  }
}

/** The api's own schema: the metrics table's fields, and the form's defaults (JobConfig's). */
async function loadSchema() {
  const schema = await fetch("/openapi.json").then((r) => r.json()).catch(() => null);
  const schemas = schema?.components?.schemas || {};
  const properties = schemas.MetricRow?.properties || {};
  state.metricFields = Object.entries(properties).map(([name, p]) => [name, p.description || ""]);
  const config = schemas.JobConfig?.properties || {};
  for (const input of $("submit-form").querySelectorAll("[data-config]")) {
    const fallback = config[input.name]?.default;
    if (input.value === "" && fallback !== undefined && fallback !== null) input.value = fallback;
  }
  renderMetricTable();
}

function plot(id, title, epochs, traces) {
  const layout = {
    title: { text: title, font: { size: 13 }, x: 0.01, xanchor: "left" },
    margin: { l: 55, r: 15, t: 30, b: 35 },
    // Epochs are whole: a tick every 1, 2, ... epochs, never 0.5.
    xaxis: { title: { text: "epoch" }, rangemode: "tozero", tick0: 0, dtick: Math.ceil(epochs / 8), tickformat: "d" },
    legend: { orientation: "h", y: 1.12, x: 1, xanchor: "right" },
  };
  Plotly.react(id, traces, layout, { displayModeBar: false, responsive: true });
}

// ---- start ----

async function start() {
  $("submit-form").addEventListener("submit", submitJob);
  $("reload").addEventListener("click", loadJobs);
  for (const verb of COMMANDS) $(verb).addEventListener("click", () => command(verb));
  for (const what of ["model", "export"]) {
    $(`download-${what}`).addEventListener("click", (event) => {
      event.preventDefault(); // the key goes in a header, which a plain link cannot send
      download(what);
    });
  }
  $("d-parent-link").addEventListener("click", (event) => {
    event.preventDefault();
    select(event.target.dataset.id);
  });
  new LiveSocket("/ws/training", onFeed, setLive);
  loadSchema();
  const chosen = location.hash.match(/^#job=([\w-]+)$/);
  if (chosen) select(chosen[1]);
  await loadJobs();
  // First visit: the newest job, so the page shows something live at once.
  if (!chosen && !state.selected && state.jobs.length) select(state.jobs[0].id);
}

start();
