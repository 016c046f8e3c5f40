// Conversations kept in this browser, in IndexedDB (media as data: URIs can outgrow
// localStorage's few megabytes). A conversation is
//   { id, title, created, updated, messages: [message] }
// and a message
//   { role: "user" | "assistant", text, images: [dataUri], audios: [{name, uri}],
//     toolCalls?, stats?, error? }
// Export writes { format: "phi4mm-conversations", version: 1, conversations: [...] }.

const DB = "phi4mm";
const STORE = "conversations";
let dbPromise = null;

function db() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      const req = indexedDB.open(DB, 1);
      req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: "id" });
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
  }
  return dbPromise;
}

async function tx(mode, f) {
  const d = await db();
  return new Promise((resolve, reject) => {
    const t = d.transaction(STORE, mode);
    const r = f(t.objectStore(STORE));
    t.oncomplete = () => resolve(r && r.result);
    t.onerror = () => reject(t.error);
    t.onabort = () => reject(t.error || new Error("the browser refused to store the conversation"));
  });
}

export function newConversation() {
  const now = Date.now();
  return { id: `c${now.toString(36)}${Math.random().toString(36).slice(2, 8)}`, title: "New chat", created: now, updated: now, messages: [] };
}

/** Every conversation, newest first. */
export async function list() {
  const all = await tx("readonly", (s) => s.getAll());
  return (all || []).sort((a, b) => b.updated - a.updated);
}

export async function get(id) {
  return tx("readonly", (s) => s.get(id));
}

export async function put(c) {
  c.updated = Date.now();
  await tx("readwrite", (s) => s.put(c));
}

export async function remove(id) {
  await tx("readwrite", (s) => s.delete(id));
}

export async function exportJson() {
  return JSON.stringify({ format: "phi4mm-conversations", version: 1, conversations: await list() }, null, 1);
}

/** Adds the conversations of an export (a conversation with a known id replaces it). */
export async function importJson(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new Error(`not a JSON file (${e.message})`);
  }
  const convs = Array.isArray(data) ? data : data && data.conversations;
  if (!Array.isArray(convs)) throw new Error("no `conversations` list in this file");
  let n = 0;
  for (const c of convs) {
    if (!c || typeof c.id !== "string" || !Array.isArray(c.messages)) throw new Error(`conversation ${n + 1} has no id or no messages`);
    for (const m of c.messages) {
      if (m.role !== "user" && m.role !== "assistant") throw new Error(`conversation ${c.id}: a message with role ${JSON.stringify(m.role)}`);
      m.text = typeof m.text === "string" ? m.text : "";
      m.images = Array.isArray(m.images) ? m.images.filter((u) => typeof u === "string" && u.startsWith("data:image/")) : [];
      m.audios = Array.isArray(m.audios) ? m.audios.filter((a) => a && typeof a.uri === "string" && a.uri.startsWith("data:")) : [];
    }
    await tx("readwrite", (s) => s.put({ title: "Imported chat", created: Date.now(), updated: Date.now(), ...c }));
    n++;
  }
  return n;
}
