// The playground: one message to a profile through the proxy's own /v1/chat/completions, streamed,
// with its time to first token and tokens per second.

import { stream } from "./api.js";
import { el, latency, setText } from "./dom.js";

let controller = null;

export function setup({ onError }) {
  el("#play-form").addEventListener("submit", (event) => {
    event.preventDefault();
    send(onError);
  });
  el("#play-stop").addEventListener("click", () => controller && controller.abort());
}

export function setModels(ids) {
  const select = el("#play-model");
  const chosen = select.value;
  select.replaceChildren(...ids.map((id) => new Option(id, id)));
  if (ids.includes(chosen)) select.value = chosen;
}

async function send(onError) {
  const model = el("#play-model").value;
  const message = el("#play-message").value.trim();
  if (!model || !message) return;
  const answer = el("#play-answer");
  answer.textContent = "";
  answer.dataset.state = "waiting";
  setText("#play-stats", `waiting for ${model}…`);
  el("#play-send").disabled = true;
  el("#play-stop").hidden = false;
  controller = new AbortController();
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  try {
    await stream("/v1/chat/completions", {
      method: "POST",
      signal: controller.signal,
      body: {
        model,
        stream: true,
        stream_options: { include_usage: true },
        messages: [{ role: "user", content: message }],
      },
      onEvent(name, data) {
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || String(event.error));
        if (event.usage) usage = event.usage;
        const delta = event.choices && event.choices[0] && event.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          chunks += 1;
          answer.append(delta.content);
          stats(started, first, chunks, usage, false);
        }
      },
    });
    answer.dataset.state = "done";
    stats(started, first, chunks, usage, true);
  } catch (error) {
    answer.dataset.state = "failed";
    if (error.name === "AbortError") setText("#play-stats", "stopped");
    else {
      setText("#play-stats", "");
      onError(`Playground: ${error.message}`);
    }
  } finally {
    el("#play-send").disabled = false;
    el("#play-stop").hidden = true;
    controller = null;
  }
}

function stats(started, first, chunks, usage, done) {
  if (first === null) {
    setText("#play-stats", done ? "no answer" : "");
    return;
  }
  const tokens = usage && usage.completion_tokens ? usage.completion_tokens : chunks;
  const seconds = (performance.now() - first) / 1000;
  const rate = seconds > 0 ? (tokens / seconds).toFixed(1) : "–";
  setText("#play-stats",
    `first token ${latency((first - started) / 1000)} · ${tokens} tokens · ${rate} tokens/s${done ? "" : "…"}`);
}
