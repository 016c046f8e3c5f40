// Generation settings, kept in localStorage: system prompt, temperature, top-p, max tokens,
// seed and a tools JSON list. `requestFields()` gives what they add to a chat request.

const KEY = "phi4mm.settings";
const DEFAULTS = { system: "", temperature: 0.7, top_p: 1, max_tokens: 1024, seed: "", tools: "" };

export function load() {
  try {
    return { ...DEFAULTS, ...JSON.parse(localStorage.getItem(KEY) || "{}") };
  } catch (_) {
    return { ...DEFAULTS };
  }
}

export function save(s) {
  localStorage.setItem(KEY, JSON.stringify(s));
}

/** The tools list in `text`, checked; throws an Error naming the problem. */
export function parseTools(text) {
  if (!text.trim()) return null;
  let tools;
  try {
    tools = JSON.parse(text);
  } catch (e) {
    throw new Error(`the tools box is not JSON: ${e.message}`);
  }
  if (!Array.isArray(tools)) tools = [tools];
  tools = tools.map((t) => (t && t.type === "function" ? t : { type: "function", function: t }));
  tools.forEach((t, i) => {
    if (!t.function || typeof t.function.name !== "string" || !t.function.name) throw new Error(`tool ${i + 1} has no function name`);
  });
  return tools;
}

/** Fields for a chat request from the settings (throws when the tools box is wrong). */
export function requestFields(s) {
  const f = {};
  const num = (v) => (v === "" || v === null || v === undefined ? null : Number(v));
  if (num(s.temperature) !== null) f.temperature = num(s.temperature);
  if (num(s.top_p) !== null) f.top_p = num(s.top_p);
  if (num(s.max_tokens) !== null) f.max_tokens = Math.max(1, Math.round(num(s.max_tokens)));
  if (num(s.seed) !== null) f.seed = Math.round(num(s.seed));
  const tools = parseTools(s.tools || "");
  if (tools) f.tools = tools;
  return f;
}

const FIELDS = ["system", "temperature", "top_p", "max_tokens", "seed", "tools"];

/** Fills the settings form from what is saved. */
export function fillForm(form) {
  const s = load();
  for (const k of FIELDS) form.elements[k].value = s[k] ?? "";
}

export function readForm(form) {
  const s = {};
  for (const k of FIELDS) s[k] = form.elements[k].value;
  return s;
}
