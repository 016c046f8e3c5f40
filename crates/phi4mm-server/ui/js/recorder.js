// Microphone recording as raw PCM: getUserMedia into an AudioWorklet that passes the samples
// back, a level (RMS of the last block) and the elapsed time for the meter, and on stop a
// 16-bit mono WAV at the device's sample rate (the server resamples to 16 kHz). Browsers allow
// the microphone only on https:// or localhost pages.

import { encodeWav } from "./media.js";

export class Recorder {
  /** `onTick(seconds, level)` about ten times a second while recording. */
  constructor(onTick) {
    this.onTick = onTick;
    this.chunks = [];
    this.level = 0;
  }

  async start() {
    if (!navigator.mediaDevices || !window.AudioWorkletNode) {
      throw new Error("this page cannot use the microphone here: browsers allow it only on https:// or http://localhost pages");
    }
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false } });
    this.ctx = new AudioContext();
    await this.ctx.audioWorklet.addModule("/ui/js/pcm-worklet.js");
    const src = this.ctx.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.ctx, "pcm-capture");
    this.node.port.onmessage = (e) => {
      const block = e.data;
      this.chunks.push(block);
      let sum = 0;
      for (const s of block) sum += s * s;
      this.level = Math.min(1, Math.sqrt(sum / block.length) * 4);
    };
    src.connect(this.node);
    this.began = performance.now();
    this.timer = setInterval(() => this.onTick((performance.now() - this.began) / 1000, this.level), 100);
  }

  /** Stops and returns the clip as a WAV Blob (null when nothing was captured). */
  async stop() {
    clearInterval(this.timer);
    this.stream?.getTracks().forEach((t) => t.stop());
    this.node?.disconnect();
    const rate = this.ctx ? this.ctx.sampleRate : 48000;
    await this.ctx?.close();
    const n = this.chunks.reduce((a, c) => a + c.length, 0);
    if (n === 0) return null;
    const all = new Float32Array(n);
    let o = 0;
    for (const c of this.chunks) {
      all.set(c, o);
      o += c.length;
    }
    this.chunks = [];
    return encodeWav(all, rate);
  }
}

export function clock(seconds) {
  const s = Math.floor(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

/**
 * Starts a recording whose timer and level show in `ui` ({ box, time, level } elements, the box
 * shown while it runs). Throws, with the microphone released, when it cannot start.
 */
export async function record(ui) {
  const r = new Recorder((seconds, level) => {
    ui.time.textContent = clock(seconds);
    ui.level.value = level;
  });
  try {
    await r.start();
  } catch (e) {
    await r.stop().catch(() => {});
    throw new Error(`Recording did not start: ${e.message}`);
  }
  ui.time.textContent = "0:00";
  ui.box.hidden = false;
  return r;
}

/** Stops `r` and hides `box`; the clip as a WAV Blob, or an Error when it captured nothing. */
export async function finish(r, box) {
  box.hidden = true;
  const wav = await r.stop();
  if (!wav) throw new Error("The recording captured no sound.");
  return wav;
}
