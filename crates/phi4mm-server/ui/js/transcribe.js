// The transcribe view: drop, choose or record audio, and get the transcript from
// `POST /v1/audio/transcriptions` (verbose_json: the text and one segment per 40 s window).
// "And translate" sends the model card's <sep> prompt as the instruction, so one pass gives the
// transcript, then `<sep>`, then the translation; each segment is split there. The result
// downloads as .txt or .srt.

import * as api from "./api.js";
import { download, onDrop } from "./media.js";
import { finish, record } from "./recorder.js";

const $ = (id) => document.getElementById(id);

export function sepPrompt(language) {
  return `Transcribe the audio to text, and then translate the audio to ${language}. Use <sep> as a separator between the original transcript and the translation.`;
}

/** A segment's text split at the first `<sep>` into [transcript, translation or null]. */
export function splitSep(text) {
  const i = text.indexOf("<sep>");
  return i < 0 ? [text.trim(), null] : [text.slice(0, i).trim(), text.slice(i + 5).trim()];
}

function stamp(seconds) {
  const ms = Math.max(0, Math.round(seconds * 1000));
  const p = (n, w = 2) => String(n).padStart(w, "0");
  return `${p(Math.floor(ms / 3600000))}:${p(Math.floor(ms / 60000) % 60)}:${p(Math.floor(ms / 1000) % 60)},${p(ms % 1000, 3)}`;
}

/** SubRip cues, one per segment: the transcript line, and the translation under it. */
export function toSrt(cues) {
  return cues.map((c, i) => `${i + 1}\n${stamp(c.start)} --> ${stamp(c.end)}\n${[c.text, c.translation].filter(Boolean).join("\n")}\n`).join("\n");
}

export class TranscribeView {
  constructor(getModel) {
    this.getModel = getModel;
    this.source = null;
    this.cues = [];
    this.recorder = null;
    const zone = $("drop-audio");
    onDrop(zone, (files) => files[0] && this.use(files[0], files[0].name));
    zone.addEventListener("keydown", (e) => {
      if ((e.key === "Enter" || e.key === " ") && e.target === zone) {
        e.preventDefault();
        $("transcribe-file").click();
      }
    });
    $("transcribe-file").addEventListener("change", (e) => {
      const f = e.target.files[0];
      if (f) this.use(f, f.name);
      e.target.value = "";
    });
    $("transcribe-record").addEventListener("click", () => (this.recorder ? this.stopRecording() : this.startRecording()));
    $("transcribe-rec-stop").addEventListener("click", () => this.stopRecording());
    $("transcribe-run").addEventListener("click", () => this.run());
    $("download-txt").addEventListener("click", () => download(`${this.base()}.txt`, this.text()));
    $("download-srt").addEventListener("click", () => download(`${this.base()}.srt`, toSrt(this.cues), "application/x-subrip"));
  }

  use(blob, name) {
    this.source = { blob, name };
    const preview = $("transcribe-preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(blob);
    preview.hidden = false;
    $("transcribe-source").textContent = `${name} (${(blob.size / 1024).toFixed(0)} KiB)`;
    $("transcribe-run").disabled = false;
  }

  base() {
    return (this.source?.name || "transcript").replace(/\.[^.]+$/, "");
  }

  text() {
    const t = this.cues.map((c) => c.text).join("\n");
    const tr = this.cues.map((c) => c.translation).filter(Boolean).join("\n");
    return tr ? `${t}\n\n${tr}\n` : `${t}\n`;
  }

  showError(message) {
    const e = $("transcribe-error");
    e.textContent = message;
    e.hidden = !message;
  }

  async run() {
    if (!this.source) return;
    const translate = $("translate").checked;
    const fields = { response_format: "verbose_json", model: this.getModel() };
    if (translate) fields.prompt = sepPrompt($("translate-to").value);
    this.showError("");
    $("transcribe-run").disabled = true;
    $("transcript").textContent = "Transcribing…";
    let out;
    try {
      out = await api.transcribe(this.source.blob, this.source.name, fields);
    } catch (e) {
      $("transcript").textContent = "";
      this.showError(e.message);
      return;
    } finally {
      $("transcribe-run").disabled = false;
    }
    const segments = out.segments && out.segments.length ? out.segments : [{ start: 0, end: out.duration || 0, text: out.text || "" }];
    this.cues = segments.map((s) => {
      const [text, translation] = translate ? splitSep(s.text) : [s.text.trim(), null];
      return { start: s.start, end: s.end, text, translation };
    });
    $("transcript").textContent = this.cues.map((c) => c.text).join("\n");
    const tr = this.cues.map((c) => c.translation).filter((t) => t !== null);
    $("translation-block").hidden = !translate;
    $("translation").textContent = tr.length ? tr.join("\n") : translate ? "(the reply had no <sep>, so no translation could be split from it)" : "";
    $("download-txt").disabled = false;
    $("download-srt").disabled = false;
  }

  async startRecording() {
    try {
      this.recorder = await record({ box: $("transcribe-recording"), time: $("transcribe-rec-time"), level: $("transcribe-rec-level") });
    } catch (e) {
      this.showError(e.message);
    }
  }

  async stopRecording() {
    const r = this.recorder;
    if (!r) return;
    this.recorder = null;
    let wav;
    try {
      wav = await finish(r, $("transcribe-recording"));
    } catch (e) {
      return this.showError(e.message);
    }
    this.use(wav, "recording.wav");
  }
}
