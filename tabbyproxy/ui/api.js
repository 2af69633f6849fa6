// The proxy's API as the page uses it: the key kept in this tab's session storage and sent as a
// header (never in a URL, which would end up in logs), JSON calls, and server-sent events read
// over fetch (EventSource cannot send a header).

const KEY_NAME = "tabbyproxy.key";

export function storedKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function headers(extra = {}) {
  const key = storedKey();
  const all = { ...extra };
  if (key) all.Authorization = `Bearer ${key}`;
  return all;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const document = await response.json();
    const error = document.error;
    message = typeof error === "string" ? error : (error && error.message) || message;
  } catch (ignored) {
    // Not JSON: the status says enough.
  }
  return new ApiError(response.status, message);
}

export async function call(path, { method = "GET", body, signal } = {}) {
  const init = { method, headers: headers(), signal, cache: "no-store" };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// POST a JSON body and read the answer as server-sent events, calling onEvent(name, data) for
// each; resolves when the stream ends.
export async function stream(path, { method = "GET", body, signal, onEvent }) {
  const init = { method, headers: headers({ Accept: "text/event-stream" }), signal, cache: "no-store" };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      dispatch(block, onEvent);
    }
  }
  if (buffer.trim()) dispatch(buffer, onEvent);
}

function dispatch(block, onEvent) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  if (data.length) onEvent(name, data.join("\n"));
}
