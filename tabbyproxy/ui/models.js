// The models table: one row per profile with its state, what it serves, when it unloads, and the
// load and unload buttons (admin key only).  Times are counted here, from the server's
// timestamps, so the server sends a snapshot only when something changes.

import { call } from "./api.js";
import { el, duration, setText } from "./dom.js";

let snapshot = null;
let clockOffset = 0; // server time minus this browser's time, in ms
let onAction = () => {};

export function setup({ onError }) {
  onAction = onError;
  setInterval(tick, 1000);
}

export function current() {
  return snapshot;
}

export function show(document) {
  snapshot = document;
  if (document.now) clockOffset = Date.parse(document.now) - Date.now();
  const body = document.models.map(row);
  el("#models-table tbody").replaceChildren(...body);
  const loaded = document.models.filter((m) => m.state !== "stopped").length;
  const gpus = (document.gpus || []).map((gpu) =>
    `GPU ${gpu.index}: ${gib(gpu.accounted_bytes)} of ${gib(gpu.capacity_bytes)}`);
  setText("#models-summary", [`${document.models.length} profiles, ${loaded} loaded` +
    (document.waiting ? `, ${document.waiting} waiting` : ""), ...gpus].join(" · "));
  const lastError = el("#last-error");
  lastError.hidden = !document.last_error;
  lastError.textContent = document.last_error ? `Last error: ${document.last_error}` : "";
  tick();
}

function stateOf(model) {
  if (model.last_error && model.state === "stopped") return "failed";
  return model.state;
}

function row(model) {
  const tr = document.createElement("tr");
  tr.dataset.model = model.id;
  const state = stateOf(model);

  const name = document.createElement("td");
  name.append(model.id);
  if (model.model_name && model.model_name !== model.id) {
    const sub = document.createElement("span");
    sub.className = "sub";
    sub.textContent = model.model_name;
    name.append(sub);
  }

  const stateCell = document.createElement("td");
  const label = document.createElement("span");
  label.className = "state";
  label.dataset.state = state;
  label.textContent = state;
  stateCell.append(label);
  const since = document.createElement("span");
  since.className = "sub elapsed";
  if (model.state === "starting" && model.started_at) since.dataset.since = model.started_at;
  stateCell.append(since);
  if (state === "failed") {
    const cause = document.createElement("span");
    cause.className = "sub error";
    cause.textContent = model.last_error;
    stateCell.append(cause);
  }

  const requests = document.createElement("td");
  requests.className = "num";
  requests.dataset.label = "Requests";
  requests.textContent = `${model.in_flight || 0} running` + (model.waiting ? `, ${model.waiting} waiting` : "");

  const unload = document.createElement("td");
  unload.className = "countdown";
  unload.dataset.label = "Unloads";
  const timer = model.unload;
  if (!timer || model.state === "stopped") unload.textContent = "–";
  else if (timer.fires_at) unload.dataset.at = timer.fires_at;
  else if (timer.keep_alive_seconds === null) unload.textContent = "never";
  else unload.textContent = `${timer.keep_alive} after its last request`;

  const memory = document.createElement("td");
  memory.className = "num";
  memory.dataset.label = "GPU memory";
  const used = model.gpu_memory;
  memory.textContent = used ? `${gib(used.total)} on GPU ${model.gpus.join(", ")}` +
    (used.measured ? "" : " (estimated)") : "–";

  const actions = document.createElement("td");
  actions.className = "actions-cell admin-only";
  const load = button("Load", "load", model.id, model.state !== "stopped");
  const unloadButton = button("Unload", "unload", model.id, model.state === "stopped");
  actions.append(load, unloadButton);

  tr.append(name, stateCell, requests, unload, memory, actions);
  return tr;
}

function gib(bytes) {
  return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
}

function button(text, action, id, disabled) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.className = action === "load" ? "" : "quiet";
  b.dataset.action = action;
  b.disabled = disabled;
  b.setAttribute("aria-label", `${text} ${id}`);
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      await call(`/ui/api/${action}`, { method: "POST", body: { model: id } });
    } catch (error) {
      b.disabled = false;
      onAction(`${text} ${id}: ${error.message}`);
    }
  });
  return b;
}

function tick() {
  const now = Date.now() + clockOffset;
  for (const cell of document.querySelectorAll("#models-table [data-since]")) {
    cell.textContent = `for ${duration((now - Date.parse(cell.dataset.since)) / 1000)}`;
  }
  for (const cell of document.querySelectorAll("#models-table [data-at]")) {
    const left = (Date.parse(cell.dataset.at) - now) / 1000;
    cell.textContent = left > 0 ? `in ${duration(left)}` : "now";
  }
}
