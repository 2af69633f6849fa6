// The live log (admin key only): the proxy's lines and TabbyAPI's, filtered here by source,
// model and level, pausable.  At most MAX_LINES are kept in the page.

import { el, clock, setText } from "./dom.js";

const MAX_LINES = 1500;
const LEVELS = { debug: 0, info: 1, warn: 2, error: 3, critical: 4 };
let lines = [];
let paused = false;
let missed = 0;
let dropped = 0;

export function setup() {
  for (const id of ["#log-source", "#log-model", "#log-level"]) el(id).addEventListener("change", render);
  const pause = el("#log-pause");
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused) {
      missed = 0;
      render();
    }
    summary();
  });
}

export function setModels(ids) {
  const select = el("#log-model");
  const chosen = select.value;
  const options = [new Option("all", ""), ...ids.map((id) => new Option(id, id))];
  select.replaceChildren(...options);
  select.value = ids.includes(chosen) ? chosen : "";
}

export function noteDropped(count) {
  dropped += count;
  summary();
}

export function reset(records) {
  lines = records.slice(-MAX_LINES);
  render();
}

export function add(record) {
  lines.push(record);
  if (lines.length > MAX_LINES) lines.shift();
  if (paused) {
    missed += 1;
    summary();
    return;
  }
  if (wanted(record)) {
    const list = el("#log-lines");
    const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
    list.append(line(record));
    while (list.childElementCount > MAX_LINES) list.firstElementChild.remove();
    if (stick) list.scrollTop = list.scrollHeight;
  }
  summary();
}

function wanted(record) {
  const source = el("#log-source").value;
  const model = el("#log-model").value;
  const level = el("#log-level").value;
  if (source && record.source !== source) return false;
  if (model && record.model !== model) return false;
  if (level && (LEVELS[record.level] ?? 1) < LEVELS[level]) return false;
  return true;
}

function line(record) {
  const li = document.createElement("li");
  li.dataset.level = record.level;
  li.dataset.source = record.source;
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = clock(record.time) + " ";
  const source = document.createElement("span");
  source.className = "src";
  source.textContent = (record.source === "tabby" ? `[${record.model || "tabby"}]` : "[proxy]") + " ";
  li.append(time, source, record.text);
  return li;
}

function render() {
  const list = el("#log-lines");
  list.replaceChildren(...lines.filter(wanted).map(line));
  list.scrollTop = list.scrollHeight;
  summary();
}

function summary() {
  const skipped = dropped ? `, ${dropped} events skipped while the proxy was busy` : "";
  setText("#logs-summary", (paused ? `paused, ${missed} new lines not shown` : `${lines.length} lines`) + skipped);
}
