// The chat view: a conversation's messages, the composer with its attachments, sending a
// streamed request, stop (aborting the request, which cancels it on the server), regenerate,
// and edit-and-resend. Replies are rendered through markdown.js only.

import * as api from "./api.js";
import { enhance, render } from "./markdown.js";
import { adapterOf, chatMessages, Reply } from "./request.js";
import * as settings from "./settings.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);

export class ChatView {
  /** `onChange(conv)` after a conversation is saved (to refresh the list). */
  constructor(onChange) {
    this.onChange = onChange;
    this.conv = store.newConversation();
    this.pending = { images: [], audios: [] };
    this.controller = null;
    this.model = undefined;
  }

  get busy() {
    return this.controller !== null;
  }

  show(conv) {
    this.stop();
    this.conv = conv;
    $("title").textContent = conv.title;
    this.renderAll();
  }

  renderAll() {
    const box = $("messages");
    box.replaceChildren(...this.conv.messages.map((m, i) => this.messageEl(m, i)));
    box.scrollTop = box.scrollHeight;
  }

  messageEl(m, i) {
    const el = document.createElement("div");
    el.className = `msg ${m.role}${m.error ? " error" : ""}`;
    el.dataset.index = i;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = m.role === "user" ? "You" : m.error ? "Error" : "phi4mm";
    el.append(who);
    if ((m.images && m.images.length) || (m.audios && m.audios.length)) el.append(mediaEl(m));
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    fillBubble(bubble, m);
    el.append(bubble, this.actionsEl(m, i));
    return el;
  }

  actionsEl(m, i) {
    const bar = document.createElement("div");
    bar.className = "actions";
    const last = i === this.conv.messages.length - 1;
    const button = (label, f) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.addEventListener("click", f);
      bar.append(b);
    };
    if (m.role === "user" && !this.busy) button("Edit", () => this.edit(i));
    if (m.role === "assistant" && last && !this.busy) button("Regenerate", () => this.regenerate());
    if (m.role === "assistant" && m.text) button("Copy", () => navigator.clipboard.writeText(m.text).catch(() => {}));
    if (m.stats) {
      const s = document.createElement("span");
      s.className = "stats";
      s.textContent = statsText(m.stats);
      bar.append(s);
    }
    return bar;
  }

  /** Sends the composer's text and attachments. */
  async send(text) {
    if (this.busy) return;
    const { images, audios } = this.pending;
    if (!text.trim() && !images.length && !audios.length) return;
    this.conv.messages.push({ role: "user", text, images: images.map((a) => a.uri), audios: audios.map((a) => ({ name: a.name, uri: a.uri })) });
    if (this.conv.title === "New chat") this.conv.title = (text.trim() || (images.length ? "Image" : "Audio")).slice(0, 48);
    $("title").textContent = this.conv.title;
    this.pending = { images: [], audios: [] };
    document.dispatchEvent(new CustomEvent("attachments-changed"));
    await this.run();
  }

  async regenerate() {
    while (this.conv.messages.length && this.conv.messages[this.conv.messages.length - 1].role === "assistant") this.conv.messages.pop();
    await this.run();
  }

  edit(i) {
    const m = this.conv.messages[i];
    const el = $("messages").querySelector(`.msg[data-index="${i}"]`);
    const bubble = el.querySelector(".bubble");
    const area = document.createElement("textarea");
    area.value = m.text;
    const box = document.createElement("div");
    box.className = "edit";
    const save = document.createElement("button");
    save.type = "button";
    save.className = "primary";
    save.textContent = "Save & send";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.textContent = "Cancel";
    box.append(area, save, cancel);
    bubble.replaceChildren(box);
    area.focus();
    cancel.addEventListener("click", () => this.renderAll());
    save.addEventListener("click", async () => {
      this.conv.messages = this.conv.messages.slice(0, i + 1);
      this.conv.messages[i] = { ...m, text: area.value };
      await this.run();
    });
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  /** Streams the assistant's answer to the conversation as it stands. */
  async run() {
    const conv = this.conv;
    const conf = settings.load();
    const reply = { role: "assistant", text: "", images: [], audios: [] };
    let body;
    try {
      body = { messages: chatMessages(conv, conf.system), ...settings.requestFields(conf) };
    } catch (e) {
      conv.messages.push({ ...reply, text: e.message, error: true });
      return this.finish(conv);
    }
    if (this.model) body.model = this.model;
    conv.messages.push(reply);
    this.controller = new AbortController();
    setBusy(true);
    this.renderAll();
    const bubble = $("messages").lastElementChild.querySelector(".bubble");
    const acc = new Reply();
    const t0 = performance.now();
    let first = null;
    let usage = null;
    let adapter = "text";
    let queued = false;
    const paint = () => {
      queued = false;
      reply.text = acc.text;
      reply.toolCalls = acc.calls.filter(Boolean);
      if (this.conv !== conv) return;
      fillBubble(bubble, reply);
      const box = $("messages");
      box.scrollTop = box.scrollHeight;
    };
    try {
      await api.streamChat(body, this.controller.signal, {
        headers: (res) => (adapter = adapterOf(res)),
        delta: (d) => {
          if (first === null && (d.content || d.tool_calls)) first = performance.now();
          acc.add(d);
          if (!queued) {
            queued = true;
            requestAnimationFrame(paint);
          }
        },
        usage: (u) => (usage = u),
      });
    } catch (e) {
      if (e.name !== "AbortError") {
        reply.error = true;
        reply.text = (acc.text ? acc.text + "\n\n" : "") + e.message;
        reply.status = e.status;
      }
    }
    if (!reply.error) {
      paint();
      reply.stats = replyStats(adapter, t0, first, usage, this.controller.signal.aborted);
    }
    return this.finish(conv);
  }

  /** Saves the conversation, then shows it idle (so a finished reply is always saved). */
  async finish(conv) {
    this.controller = null;
    try {
      await store.put(conv);
    } catch (e) {
      conv.messages.push({ role: "assistant", text: `This conversation could not be saved in the browser: ${e.message}`, error: true, images: [], audios: [] });
    }
    setBusy(false);
    if (this.conv === conv) this.renderAll();
    this.onChange(conv);
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function fillBubble(bubble, m) {
  if (m.role === "user" || m.error) {
    const p = document.createElement("p");
    p.className = "plain";
    p.textContent = m.text;
    bubble.replaceChildren(p);
    return;
  }
  bubble.innerHTML = render(m.text);
  for (const c of m.toolCalls || []) {
    const d = document.createElement("div");
    d.className = "tool-call";
    d.textContent = `→ ${c.function.name}(${c.function.arguments})`;
    bubble.append(d);
  }
  enhance(bubble);
}

function mediaEl(m) {
  const box = document.createElement("div");
  box.className = "media";
  for (const uri of m.images || []) {
    const img = document.createElement("img");
    img.src = uri;
    img.alt = "attached image";
    box.append(img);
  }
  for (const a of m.audios || []) {
    const au = document.createElement("audio");
    au.controls = true;
    au.src = a.uri;
    au.title = a.name;
    box.append(au);
  }
  return box;
}

/** What a reply's stats line shows: adapter, time to first token, tok/s (from the first token on). */
function replyStats(adapter, t0, first, usage, stopped) {
  const end = performance.now();
  const tokens = usage ? usage.completion_tokens : null;
  const tps = tokens && first !== null && end > first ? tokens / ((end - first) / 1000) : null;
  return { adapter, ttft_ms: first === null ? null : first - t0, tokens, tps, stopped };
}

function statsText(s) {
  const parts = [`adapter: ${s.adapter}`];
  if (s.ttft_ms !== null && s.ttft_ms !== undefined) parts.push(`TTFT ${(s.ttft_ms / 1000).toFixed(2)} s`);
  if (s.tps) parts.push(`${s.tps.toFixed(1)} tok/s`);
  if (s.tokens !== null && s.tokens !== undefined) parts.push(`${s.tokens} tokens`);
  if (s.stopped) parts.push("stopped");
  return parts.join(" · ");
}
