// The page's only way to the server: its own OpenAI-compatible /v1 API, with the API key the
// user gave (kept in localStorage) as a Bearer token. Errors arrive as OpenAI error bodies and
// become ApiError with the server's message, type and HTTP status.

const KEY = "phi4mm.apiKey";

export class ApiError extends Error {
  constructor(status, message, type = "", param = null) {
    super(message);
    this.status = status;
    this.type = type;
    this.param = param;
  }
}

let askKey = async () => null;

/** How to ask the user for a key when the server answers 401 (returns the key or null). */
export function onKeyNeeded(f) {
  askKey = f;
}

export function apiKey() {
  return localStorage.getItem(KEY) || "";
}

export function setApiKey(k) {
  if (k) localStorage.setItem(KEY, k);
  else localStorage.removeItem(KEY);
}

function headers(extra = {}) {
  const h = { ...extra };
  const k = apiKey();
  if (k) h.Authorization = `Bearer ${k}`;
  return h;
}

/** The error a failed response carries, from its OpenAI error body when it has one. */
export async function errorOf(res) {
  let text = "";
  try {
    text = await res.text();
    const e = JSON.parse(text).error;
    if (e && e.message) {
      const retry = res.headers.get("retry-after");
      const suffix = res.status === 503 && retry ? ` (retry in ${retry} s)` : "";
      return new ApiError(res.status, e.message + suffix, e.type || "", e.param ?? null);
    }
  } catch (_) { /* not JSON: fall through */ }
  return new ApiError(res.status, `HTTP ${res.status}${text ? ": " + text.slice(0, 300) : ""}`);
}

/** fetch with the key; on 401 asks for a key once and retries. Throws ApiError unless ok. */
export async function call(path, init = {}) {
  for (let attempt = 0; ; attempt++) {
    let res;
    try {
      res = await fetch(path, { ...init, headers: headers(init.headers || {}) });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, `the server did not answer (${e.message})`);
    }
    if (res.ok) return res;
    if (res.status === 401 && attempt === 0) {
      const k = await askKey();
      if (k !== null) {
        setApiKey(k);
        continue;
      }
    }
    throw await errorOf(res);
  }
}

export async function models() {
  const res = await call("/v1/models");
  return (await res.json()).data || [];
}

/**
 * A streamed chat completion. `on.headers(res)` once the answer starts, `on.delta(choiceDelta)`
 * for each chunk's first choice delta, `on.usage(usage)` for the final usage chunk. Resolves
 * to the finish reason.
 */
export async function streamChat(body, signal, on) {
  const res = await call("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  on.headers?.(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message || "the stream failed", chunk.error.type || "");
        if (chunk.usage) on.usage?.(chunk.usage);
        const c = chunk.choices && chunk.choices[0];
        if (c) {
          if (c.delta) on.delta(c.delta);
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
  }
  return finish;
}

/** `POST /v1/audio/transcriptions` with a multipart form; the verbose_json answer. */
export async function transcribe(blob, filename, fields) {
  const form = new FormData();
  form.append("file", blob, filename);
  for (const [k, v] of Object.entries(fields)) if (v !== undefined && v !== null) form.append(k, String(v));
  const res = await call("/v1/audio/transcriptions", { method: "POST", body: form });
  return res.json();
}

/** The server's Prometheus text (for the running count). */
export async function metricsText() {
  const res = await call("/metrics");
  return res.text();
}
