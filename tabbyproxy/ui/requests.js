// The last requests (admin key only): a table, newest first, and a chart of tokens per second and
// time to first token.  The proxy keeps the history; the page shows its latest rows.

import { el, clock, latency, setText } from "./dom.js";

const SHOWN = 100;
const CHARTED = 60;
let records = [];

export function reset(list) {
  records = list.slice(-SHOWN);
  render();
}

export function add(record) {
  records.push(record);
  if (records.length > SHOWN) records.shift();
  render();
}

function render() {
  const rows = records.slice().reverse().map(row);
  el("#requests-table tbody").replaceChildren(...rows);
  setText("#requests-summary", records.length ? `last ${records.length}` : "none yet");
  chart();
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function row(record) {
  const tr = document.createElement("tr");
  tr.dataset.status = record.status;
  const tokens = `${record.tokensIn ?? "–"} / ${record.tokensOut ?? "–"}${record.tokensOut !== null && !record.tokensExact ? " ≈" : ""}`;
  const route = cell(`${record.method} ${record.route}`);
  if (record.prompt) {
    const sub = document.createElement("span");
    sub.className = "sub";
    sub.textContent = record.prompt.length > 120 ? record.prompt.slice(0, 120) + "…" : record.prompt;
    route.append(sub);
  }
  tr.append(
    cell(clock(record.time)),
    route,
    cell(record.model || "–"),
    cell(String(record.status), record.status >= 400 ? "error" : ""),
    cell(latency(record.firstToken), "num"),
    cell(tokens, "num"),
    cell(record.tokensPerSecond === null ? "–" : record.tokensPerSecond.toFixed(1), "num"),
    cell(latency(record.seconds), "num"),
  );
  return tr;
}

const SVG = "http://www.w3.org/2000/svg";

// One series scaled to its own maximum (the two have different units): a line and its points.
function series(values, className, width, height) {
  const top = Math.max(...values.filter((v) => v !== null), 0) || 1;
  const step = values.length > 1 ? width / (values.length - 1) : 0;
  const points = [];
  values.forEach((v, i) => {
    if (v !== null) points.push([i * step + (values.length > 1 ? 0 : width / 2), height - 6 - (v / top) * (height - 12)]);
  });
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "));
  line.setAttribute("class", className);
  const dots = points.map(([x, y]) => {
    const dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("cx", x.toFixed(1));
    dot.setAttribute("cy", y.toFixed(1));
    dot.setAttribute("r", "2.5");
    dot.setAttribute("class", className);
    return dot;
  });
  return [line, ...dots];
}

function chart() {
  const charted = records.filter((r) => r.model && r.status < 400).slice(-CHARTED);
  el("#chart").replaceChildren(
    ...series(charted.map((r) => r.tokensPerSecond), "tps", 600, 120),
    ...series(charted.map((r) => r.firstToken), "ttft", 600, 120),
  );
}
