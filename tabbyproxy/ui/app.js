// The dashboard's start: ask what the key may do (and for a key when the proxy needs one), then
// follow /events, which sends the models' state when it changes and, for the admin key, the
// requests and the log.  A dropped stream is reopened after a short, growing pause.

import { call, storeKey, storedKey, stream } from "./api.js";
import { el, setText } from "./dom.js";
import * as logs from "./logs.js";
import * as models from "./models.js";
import * as playground from "./playground.js";
import * as requests from "./requests.js";

let permission = "none";
let retry = 1000;

function showError(message) {
  const banner = el("#banner");
  banner.textContent = message;
  banner.hidden = !message;
}

function connection(state, text) {
  const pill = el("#connection");
  pill.dataset.state = state;
  pill.textContent = text;
}

function applyPermission(session) {
  permission = session.permission;
  document.body.dataset.permission = permission;
  const admin = permission === "admin";
  for (const node of document.querySelectorAll(".admin-only")) node.hidden = !admin;
  for (const node of document.querySelectorAll(".needs-admin")) node.hidden = admin;
  const pill = el("#permission");
  pill.hidden = !session.auth;
  pill.textContent = admin ? "admin key" : "API key";
  el("#forget-key").hidden = !(session.auth && storedKey());
  setText("#version", `v${session.version}`);
}

function askForKey(refused) {
  const dialog = el("#key-dialog");
  const error = el("#key-error");
  error.hidden = !refused;
  error.textContent = refused ? "That key was refused. Check it and try again." : "";
  el("#key-input").value = "";
  if (!dialog.open) dialog.showModal();
  el("#key-input").focus();
}

async function start() {
  let session;
  try {
    session = await call("/ui/api/session");
  } catch (error) {
    connection("down", "unreachable");
    showError(`The proxy did not answer: ${error.message}`);
    setTimeout(start, retry);
    retry = Math.min(retry * 2, 15000);
    return;
  }
  if (session.auth && session.permission === "none") {
    if (session.key_refused) storeKey(null);
    connection("down", "needs a key");
    askForKey(session.key_refused);
    return;
  }
  const dialog = el("#key-dialog");
  if (dialog.open) dialog.close();
  showError("");
  applyPermission(session);
  follow();
}

function onEvent(name, data) {
  const document = JSON.parse(data);
  switch (name) {
    case "hello":
      connection("live", "live");
      retry = 1000;
      break;
    case "models": {
      models.show(document);
      const ids = document.models.map((m) => m.id);
      playground.setModels(ids);
      logs.setModels(ids);
      break;
    }
    case "requests":
      requests.reset(document);
      break;
    case "request":
      requests.add(document);
      break;
    case "logs":
      logs.reset(document);
      break;
    case "log":
      logs.add(document);
      break;
    case "dropped":
      // The proxy was busier than this page could follow: say so where the lines are missing.
      logs.noteDropped(document.count);
      break;
  }
}

async function follow() {
  const path = permission === "admin" ? "/events?logs" : "/events";
  connection("connecting", "connecting…");
  try {
    await stream(path, { onEvent });
    connection("down", "reconnecting…");
  } catch (error) {
    connection("down", "reconnecting…");
    if (error.status === 401) {
      storeKey(null);
      start();
      return;
    }
  }
  setTimeout(follow, retry);
  retry = Math.min(retry * 2, 15000);
}

el("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = el("#key-input").value.trim();
  if (!key) return;
  storeKey(key);
  start();
});
el("#key-dialog").addEventListener("cancel", (event) => event.preventDefault());
el("#forget-key").addEventListener("click", () => {
  storeKey(null);
  location.reload();
});

models.setup({ onError: showError });
logs.setup();
playground.setup({ onError: showError });
start();
