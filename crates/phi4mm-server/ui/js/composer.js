// The composer's attachments: images and audio files by button, drag-and-drop and paste, and
// microphone recordings (a level meter and a timer while recording, then a playable clip).
// They wait in `chat.pending` with thumbnails and remove buttons until the message is sent.

import { blobToDataUri, onDrop, readDataUri, sortFiles } from "./media.js";
import { notify } from "./notice.js";
import { finish, record } from "./recorder.js";

const $ = (id) => document.getElementById(id);

export class Composer {
  constructor(chat) {
    this.chat = chat;
    this.recorder = null;
    this.recordings = 0;
    for (const id of ["attach-image", "attach-audio"]) {
      $(id).addEventListener("change", async (e) => {
        await this.add([...e.target.files]);
        e.target.value = "";
      });
    }
    onDrop($("chat-view"), (files) => this.add(files));
    $("input").addEventListener("paste", (e) => {
      const files = [...(e.clipboardData?.files || [])];
      if (files.length) {
        e.preventDefault();
        this.add(files);
      }
    });
    $("record").addEventListener("click", () => (this.recorder ? this.stopRecording() : this.startRecording()));
    $("rec-stop").addEventListener("click", () => this.stopRecording());
    document.addEventListener("attachments-changed", () => this.render());
  }

  /** Adds dropped, pasted or chosen files (anything but images and audio is refused). */
  async add(files) {
    const { images, audios, skipped } = sortFiles(files);
    if (skipped.length) notify(`Not an image or audio file, so not attached: ${skipped.join(", ")}`);
    try {
      for (const f of images) this.chat.pending.images.push({ name: f.name || "pasted image", uri: await readDataUri(f) });
      for (const f of audios) this.chat.pending.audios.push({ name: f.name || "audio", uri: await readDataUri(f) });
    } catch (e) {
      notify(e.message);
    }
    this.render();
  }

  render() {
    const box = $("attachments");
    const { images, audios } = this.chat.pending;
    const item = (list, i, media) => {
      const a = list[i];
      const el = document.createElement("div");
      el.className = "attachment";
      el.title = a.name;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove ${a.name}`);
      remove.addEventListener("click", () => {
        list.splice(i, 1);
        this.render();
      });
      el.append(media, remove);
      return el;
    };
    const els = images.map((a, i) => {
      const img = document.createElement("img");
      img.src = a.uri;
      img.alt = a.name;
      return item(images, i, img);
    });
    for (let i = 0; i < audios.length; i++) {
      const au = document.createElement("audio");
      au.controls = true;
      au.src = audios[i].uri;
      const name = document.createElement("span");
      name.className = "muted";
      name.textContent = audios[i].name;
      const wrap = document.createElement("span");
      wrap.append(au, name);
      els.push(item(audios, i, wrap));
    }
    box.replaceChildren(...els);
  }

  async startRecording() {
    try {
      this.recorder = await record({ box: $("recording"), time: $("rec-time"), level: $("rec-level") });
    } catch (e) {
      return notify(e.message);
    }
    $("record").setAttribute("aria-pressed", "true");
  }

  async stopRecording() {
    const r = this.recorder;
    if (!r) return;
    this.recorder = null;
    $("record").setAttribute("aria-pressed", "false");
    let wav;
    try {
      wav = await finish(r, $("recording"));
    } catch (e) {
      return notify(e.message);
    }
    this.recordings += 1;
    this.chat.pending.audios.push({ name: `recording-${this.recordings}.wav`, uri: await blobToDataUri(wav) });
    this.render();
  }
}
