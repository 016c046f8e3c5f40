// Attachments as the API takes them: images as data: URIs in `image_url` parts; audio as
// `input_audio` (OpenAI's part, wav or mp3) or, for other formats the server decodes (flac,
// ogg, m4a…), vLLM's `audio_url` with a data: URI. Recordings are PCM encoded here as 16-bit
// WAV, so the server needs no Opus/WebM decoder.

export function readDataUri(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(new Error(`could not read ${file.name}: ${r.error && r.error.message}`));
    r.readAsDataURL(file);
  });
}

export function blobToDataUri(blob) {
  return readDataUri(blob);
}

/** The `input_audio` format of a data: URI, or null when it needs `audio_url`. */
function inputAudioFormat(uri) {
  const mime = uri.slice(5, uri.indexOf(";")).toLowerCase();
  if (["audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"].includes(mime)) return "wav";
  if (["audio/mpeg", "audio/mp3"].includes(mime)) return "mp3";
  return null;
}

/** The OpenAI content part for an attached audio. */
export function audioPart(uri) {
  const format = inputAudioFormat(uri);
  if (format) return { type: "input_audio", input_audio: { data: uri.slice(uri.indexOf(",") + 1), format } };
  return { type: "audio_url", audio_url: { url: uri } };
}

export function imagePart(uri) {
  return { type: "image_url", image_url: { url: uri } };
}

/** Mono float samples at `rate` Hz as a 16-bit PCM WAV Blob. */
export function encodeWav(samples, rate) {
  const buf = new ArrayBuffer(44 + samples.length * 2);
  const v = new DataView(buf);
  const str = (o, s) => [...s].forEach((c, i) => v.setUint8(o + i, c.charCodeAt(0)));
  str(0, "RIFF");
  v.setUint32(4, 36 + samples.length * 2, true);
  str(8, "WAVE");
  str(12, "fmt ");
  v.setUint32(16, 16, true);
  v.setUint16(20, 1, true); // PCM
  v.setUint16(22, 1, true); // mono
  v.setUint32(24, rate, true);
  v.setUint32(28, rate * 2, true);
  v.setUint16(32, 2, true);
  v.setUint16(34, 16, true);
  str(36, "data");
  v.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    v.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Blob([buf], { type: "audio/wav" });
}

/** Files dropped or pasted, split into images and audio (others are named in `skipped`). */
export function sortFiles(files) {
  const out = { images: [], audios: [], skipped: [] };
  for (const f of files) {
    if (f.type.startsWith("image/")) out.images.push(f);
    else if (f.type.startsWith("audio/") || /\.(wav|mp3|flac|ogg|m4a)$/i.test(f.name)) out.audios.push(f);
    else out.skipped.push(f.name || "a file");
  }
  return out;
}

/** Calls `f(files)` when files are dropped on `el` (marked `.over` while they hover). */
export function onDrop(el, f) {
  el.addEventListener("dragover", (e) => {
    e.preventDefault();
    el.classList.add("over");
  });
  el.addEventListener("dragleave", () => el.classList.remove("over"));
  el.addEventListener("drop", (e) => {
    e.preventDefault();
    el.classList.remove("over");
    f([...e.dataTransfer.files]);
  });
}

export function download(name, text, type = "text/plain") {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type }));
  a.download = name;
  document.body.appendChild(a);
  a.click();
  setTimeout(() => {
    URL.revokeObjectURL(a.href);
    a.remove();
  }, 1000);
}
