// Wires the page together: theme, the conversation list (new, open, delete, export, import),
// the settings and API-key dialogs, the model name from /v1/models, the composer's keys
// (Enter sends, Shift+Enter is a new line, Esc stops) and the switch to the transcribe view.

import * as api from "./api.js";
import { ChatView } from "./chat.js";
import { Composer } from "./composer.js";
import { download } from "./media.js";
import { clearNotice, notify } from "./notice.js";
import * as settings from "./settings.js";
import * as store from "./store.js";
import { TranscribeView } from "./transcribe.js";

const $ = (id) => document.getElementById(id);
const CURRENT = "phi4mm.current";

const chat = new ChatView((conv) => {
  localStorage.setItem(CURRENT, conv.id);
  refreshList();
});
new Composer(chat);
new TranscribeView(() => chat.model);

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  $("hl-light").disabled = theme === "dark";
  $("hl-dark").disabled = theme !== "dark";
}

function showView(name) {
  $("chat-view").hidden = name !== "chat";
  $("transcribe-view").hidden = name !== "transcribe";
  if (name === "transcribe") $("title").textContent = "Transcribe audio";
  else $("title").textContent = chat.conv.title;
  $("sidebar").classList.remove("open");
}

async function refreshList() {
  let convs;
  try {
    convs = await store.list();
  } catch (e) {
    return notify(`Saved conversations could not be read: ${e.message}`);
  }
  const items = convs.map((c) => {
    const li = document.createElement("li");
    if (c.id === chat.conv.id) li.className = "active";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title;
    open.addEventListener("click", () => openConversation(c.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.setAttribute("aria-label", `Delete conversation ${c.title}`);
    del.addEventListener("click", () => deleteConversation(c.id));
    li.append(open, del);
    return li;
  });
  $("conversations").replaceChildren(...items);
}

async function openConversation(id) {
  const c = await store.get(id).catch(() => null);
  if (!c) return notify("That conversation is no longer saved in this browser.");
  chat.show(c);
  localStorage.setItem(CURRENT, id);
  showView("chat");
  refreshList();
}

function newChat() {
  chat.show(store.newConversation());
  localStorage.removeItem(CURRENT);
  showView("chat");
  refreshList();
  $("input").focus();
}

async function deleteConversation(id) {
  await store.remove(id).catch((e) => notify(`Could not delete: ${e.message}`));
  if (id === chat.conv.id) newChat();
  else refreshList();
}

function bindSidebar() {
  $("new-chat").addEventListener("click", newChat);
  $("open-transcribe").addEventListener("click", () => showView("transcribe"));
  $("toggle-sidebar").addEventListener("click", () => $("sidebar").classList.toggle("open"));
  $("export").addEventListener("click", async () => download("phi4mm-conversations.json", await store.exportJson(), "application/json"));
  $("import").addEventListener("change", async (e) => {
    const f = e.target.files[0];
    e.target.value = "";
    if (!f) return;
    try {
      const n = await store.importJson(await f.text());
      notify(`Imported ${n} conversation${n === 1 ? "" : "s"}.`, "info");
    } catch (err) {
      notify(`Import failed: ${err.message}`);
    }
    refreshList();
  });
  $("theme").addEventListener("click", () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem("phi4mm.theme", next);
    applyTheme(next);
  });
  $("notice").querySelector("button").addEventListener("click", clearNotice);
  for (const b of document.querySelectorAll("[data-pick]")) b.addEventListener("click", () => $(b.dataset.pick).click());
}

function bindDialogs() {
  for (const d of document.querySelectorAll("dialog")) d.querySelector(".cancel").addEventListener("click", () => d.close("cancel"));
  const dialog = $("settings-dialog");
  const form = $("settings-form");
  $("open-settings").addEventListener("click", () => {
    settings.fillForm(form);
    $("settings-error").hidden = true;
    dialog.showModal();
  });
  form.addEventListener("submit", (e) => {
    if (e.submitter?.value !== "save") return;
    const s = settings.readForm(form);
    try {
      settings.requestFields(s);
    } catch (err) {
      e.preventDefault();
      $("settings-error").textContent = err.message;
      $("settings-error").hidden = false;
      return;
    }
    settings.save(s);
  });
  let asking = null;
  api.onKeyNeeded(() => {
    asking ||= new Promise((resolve) => {
      const d = $("key-dialog");
      $("key-input").value = "";
      d.returnValue = "";
      d.addEventListener("close", () => {
        asking = null;
        resolve(d.returnValue === "save" ? $("key-input").value.trim() : null);
      }, { once: true });
      d.showModal();
    });
    return asking;
  });
}

function bindComposer() {
  const input = $("input");
  const grow = () => {
    input.style.height = "auto";
    input.style.height = `${input.scrollHeight}px`;
  };
  input.addEventListener("input", grow);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const { images, audios } = chat.pending;
    if (chat.busy || (!input.value.trim() && !images.length && !audios.length)) return;
    const text = input.value;
    input.value = "";
    grow();
    chat.send(text);
  });
  $("stop").addEventListener("click", () => chat.stop());
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && chat.busy && !document.querySelector("dialog[open]")) {
      e.preventDefault();
      chat.stop();
    }
  });
}

async function loadModel() {
  try {
    const list = await api.models();
    const base = list.find((m) => !m.parent) || list[0];
    if (base) {
      chat.model = base.id;
      $("model-name").textContent = base.id;
    }
  } catch (e) {
    notify(`The server's model list did not load: ${e.message}`);
  }
}

async function start() {
  applyTheme(localStorage.getItem("phi4mm.theme") || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light"));
  bindSidebar();
  bindDialogs();
  bindComposer();
  const id = localStorage.getItem(CURRENT);
  const saved = id ? await store.get(id).catch(() => null) : null;
  if (saved) chat.show(saved);
  showView("chat");
  await refreshList();
  await loadModel();
}

start();
