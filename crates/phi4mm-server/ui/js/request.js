// A conversation as an OpenAI chat request: the system prompt, then each message with its
// media first (images, then audio) and its text after, as the model card writes its prompts
// (<|user|><|image_1|>…). Replies that called tools are sent back with their tool_calls.

import { audioPart, imagePart } from "./media.js";

export function chatMessages(conv, system) {
  const out = [];
  if (system && system.trim()) out.push({ role: "system", content: system });
  for (const m of conv.messages) {
    if (m.error) continue;
    if (m.role === "assistant") {
      const msg = { role: "assistant", content: m.text || "" };
      if (m.toolCalls && m.toolCalls.length) msg.tool_calls = m.toolCalls;
      out.push(msg);
      continue;
    }
    const media = [...(m.images || []).map(imagePart), ...(m.audios || []).map((a) => audioPart(a.uri))];
    out.push({ role: "user", content: media.length ? [...media, { type: "text", text: m.text || "" }] : m.text || "" });
  }
  return out;
}

/** The adapter that ran, from the server's header (text when it names none). */
export function adapterOf(res) {
  return res.headers.get("x-phi4mm-adapter") || "text";
}

/** Accumulates streamed deltas: content, and tool calls by index as the SDK does. */
export class Reply {
  constructor() {
    this.text = "";
    this.calls = [];
  }

  add(delta) {
    if (typeof delta.content === "string") this.text += delta.content;
    for (const tc of delta.tool_calls || []) {
      const c = (this.calls[tc.index] ||= { id: "", type: "function", function: { name: "", arguments: "" } });
      if (tc.id) c.id = tc.id;
      if (tc.function?.name) c.function.name += tc.function.name;
      if (tc.function?.arguments) c.function.arguments += tc.function.arguments;
    }
  }
}
