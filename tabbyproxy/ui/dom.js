// Small helpers the page's modules share.

export function el(selector) {
  return document.querySelector(selector);
}

export function setText(selector, text) {
  el(selector).textContent = text;
}

// 75 -> "1m 15s", 3700 -> "1h 1m", 4.2 -> "4s".
export function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = s % 60;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${rest}s`;
  return `${rest}s`;
}

// Seconds as milliseconds below 10 s ("830 ms", "2.41 s"), for latencies.
export function latency(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

export function clock(iso) {
  const date = new Date(iso);
  return date.toLocaleTimeString([], { hour12: false });
}
