// One place for messages that belong to no reply (a file that is not media, the microphone
// refused, an import that failed): a dismissable banner under the top bar.

let timer = null;

/** Shows `message`; an "info" one goes away by itself after a few seconds. */
export function notify(message, kind = "error") {
  const box = document.getElementById("notice");
  box.className = kind;
  box.querySelector(".text").textContent = message;
  box.hidden = false;
  clearTimeout(timer);
  if (kind === "info") timer = setTimeout(clearNotice, 4000);
}

export function clearNotice() {
  document.getElementById("notice").hidden = true;
}
