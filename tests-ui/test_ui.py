#!/usr/bin/env python3
"""End-to-end tests of the chat page in headless Chromium, against a running `phi4mm serve`.

    python tests-ui/test_ui.py BASE_URL API_KEY FIXTURES_DIR SCREENSHOT_DIR [CHROMIUM]

BASE_URL is the server's root (http://127.0.0.1:PORT), started on the tiny checkpoint with
`--api-key API_KEY`. Playwright's Python package drives the system Chromium (/usr/bin/chromium
unless CHROMIUM is given; Playwright's own browser download is never used), with a fake
microphone that plays FIXTURES_DIR/audio/speech_1s_16k.wav. Every answer the page shows is
compared with the server's answer to the same request sent directly, so the page can only pass
by showing what the API says. Screenshots of the main views go to SCREENSHOT_DIR. Prints
"all passed" at the end; any failure raises.
"""
import base64
import json
import os
import sys
import time
import urllib.request

from playwright.sync_api import expect, sync_playwright

BASE, KEY, FIX, SHOTS = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3], sys.argv[4]
CHROMIUM = sys.argv[5] if len(sys.argv) > 5 else "/usr/bin/chromium"
MODEL = "microsoft/Phi-4-multimodal-instruct"
TIMEOUT_MS = 60_000
PASSED = []


def ok(name):
    PASSED.append(name)
    print(f"ok {name}", flush=True)


def api(path, body=None, content_type="application/json", raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(BASE + path, data=data, headers={"Authorization": f"Bearer {KEY}", "Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read().decode()
    return json.loads(text) if text.startswith("{") else text


def running():
    """The server's running count (vLLM's gauge)."""
    for line in api("/metrics").splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.split()[-1])
    raise AssertionError("no vllm:num_requests_running in /metrics")


BOUNDARY = "phi4mmtestboundary"


def multipart(wav, fields):
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="recording.wav"\r\nContent-Type: audio/wav\r\n\r\n'.encode() + wav + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def data_uri(path, mime):
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def stored(page):
    """The page's saved conversation that is open, from IndexedDB through the page's own module."""
    return page.evaluate("""async () => {
        const store = await import('/ui/js/store.js');
        return (await store.list())[0];
    }""")


def expected_reply(messages, max_tokens):
    body = {"model": MODEL, "messages": messages, "temperature": 0, "top_p": 1, "max_tokens": max_tokens}
    return api("/v1/chat/completions", body)["choices"][0]["message"]["content"]


def wait_idle(page):
    expect(page.locator("#send")).to_be_visible(timeout=TIMEOUT_MS)


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")
    wait_idle(page)


def last_assistant(page):
    return page.locator(".msg.assistant").last


def set_settings(page, **fields):
    page.click("#open-settings")
    for k, v in fields.items():
        page.fill(f"#settings-form [name={k}]", str(v))
    page.click("#settings-save")


def hand_over(page, how, target, name, data):
    """A PNG file pasted into (`paste`) or dropped on (`drop`) the element with id `target`, as a
    browser delivers one: a DataTransfer holding a File, in a ClipboardEvent or a DragEvent."""
    page.evaluate("""([how, target, name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'image/png'}));
        const init = {bubbles: true, cancelable: true};
        const e = how === 'paste' ? new ClipboardEvent('paste', {...init, clipboardData: dt}) : new DragEvent('drop', {...init, dataTransfer: dt});
        document.getElementById(target).dispatchEvent(e);
    }""", [how, target, name, base64.b64encode(data).decode()])


def test_key_prompt_and_model(page):
    page.goto(BASE + "/")
    expect(page.locator("#key-dialog")).to_be_visible(timeout=TIMEOUT_MS)
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    expect(page.locator("#model-name")).to_have_text(MODEL, timeout=TIMEOUT_MS)
    ok("the page asks for the API key on 401 and then lists the model")


def test_settings(page):
    page.click("#open-settings")
    page.fill("#settings-form [name=tools]", "[{not json")
    page.click("#settings-save")
    expect(page.locator("#settings-error")).to_contain_text("not JSON")
    expect(page.locator("#settings-dialog")).to_be_visible()
    page.fill("#settings-form [name=tools]", "")
    page.click("#settings-save")
    expect(page.locator("#settings-dialog")).to_be_hidden()
    set_settings(page, temperature=0, top_p=1, max_tokens=12, seed=7)
    ok("settings: a bad tools box is refused with the reason; values are saved")


def test_text_chat(page):
    streamed = []
    page.on("response", lambda r: streamed.append(r.headers.get("content-type", "")) if r.url.endswith("/v1/chat/completions") else None)
    page.fill("#input", "Hello")
    page.press("#input", "Shift+Enter")
    page.type("#input", "there")
    assert page.input_value("#input") == "Hello\nthere", page.input_value("#input")
    page.press("#input", "Enter")
    wait_idle(page)
    expect(last_assistant(page).locator(".stats")).to_contain_text("adapter: text", timeout=TIMEOUT_MS)
    expect(last_assistant(page).locator(".stats")).to_contain_text("tok/s")
    expect(last_assistant(page).locator(".stats")).to_contain_text("TTFT")
    conv = stored(page)
    want = expected_reply([{"role": "user", "content": "Hello\nthere"}], 12)
    assert conv["messages"][1]["text"] == want, (conv["messages"][1]["text"], want)
    assert any(c.startswith("text/event-stream") for c in streamed), streamed
    ok("a message is sent with Enter (Shift+Enter is a new line) and the streamed reply is the API's")


def test_images(page):
    png = os.path.join(FIX, "images/square_448x448.png")
    page.focus("[data-pick=attach-image]")  # keyboard only: Enter on the Image button opens the file chooser
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files([png, os.path.join(FIX, "images/wide_500x300.png")])
    expect(page.locator("#attachments img")).to_have_count(2)
    page.click("#attachments .remove >> nth=1")
    expect(page.locator("#attachments img")).to_have_count(1)
    data = open(png, "rb").read()
    hand_over(page, "paste", "input", "pasted.png", data)
    expect(page.locator("#attachments img")).to_have_count(2)
    hand_over(page, "drop", "chat-view", "dropped.png", data)
    expect(page.locator("#attachments img")).to_have_count(3)
    page.click("#attachments .remove >> nth=2")
    send(page, "What is shown?")
    expect(last_assistant(page).locator(".stats")).to_contain_text("adapter: vision")
    expect(page.locator(".msg.user").last.locator(".media img")).to_have_count(2)
    conv = stored(page)
    uri = data_uri(png, "image/png")
    history = [{"role": "user", "content": "Hello\nthere"}, {"role": "assistant", "content": conv["messages"][1]["text"]}]
    img = {"type": "image_url", "image_url": {"url": uri}}
    want = expected_reply(history + [{"role": "user", "content": [img, img, {"type": "text", "text": "What is shown?"}]}], 12)
    assert conv["messages"][3]["text"] == want, (conv["messages"][3]["text"], want)
    page.screenshot(path=os.path.join(SHOTS, "chat.png"))
    ok("images attach by file input (opened from the keyboard), paste and drop, with thumbnails and remove; the vision adapter runs")


def test_audio_file_and_microphone(page):
    wav = os.path.join(FIX, "audio/speech_1s_16k.wav")
    page.click("#new-chat")
    page.set_input_files("#attach-audio", wav)
    expect(page.locator("#attachments audio")).to_have_count(1)
    send(page, "Transcribe the audio clip into text.")
    expect(last_assistant(page).locator(".stats")).to_contain_text("adapter: speech")
    audio = {"type": "input_audio", "input_audio": {"data": data_uri(wav, "audio/wav").split(",", 1)[1], "format": "wav"}}
    want = expected_reply([{"role": "user", "content": [audio, {"type": "text", "text": "Transcribe the audio clip into text."}]}], 12)
    assert stored(page)["messages"][1]["text"] == want
    page.click("#record")
    expect(page.locator("#recording")).to_be_visible()
    expect(page.locator("#rec-time")).to_have_text("0:01", timeout=10_000)
    deadline = time.time() + 10
    while page.evaluate("document.getElementById('rec-level').value") == 0 and time.time() < deadline:
        page.wait_for_timeout(100)
    assert page.evaluate("document.getElementById('rec-level').value") > 0, "the level meter moves"
    page.screenshot(path=os.path.join(SHOTS, "recording.png"))
    page.click("#rec-stop")
    expect(page.locator("#attachments audio")).to_have_count(1)
    send(page, "What was said?")
    expect(last_assistant(page).locator(".stats")).to_contain_text("adapter: speech")
    expect(page.locator(".msg.user").last.locator(".media audio")).to_have_count(1)
    duration = page.evaluate("""() => new Promise(r => { const a = [...document.querySelectorAll('.msg.user .media audio')].pop();
        if (a.readyState >= 1) r(a.duration); else a.onloadedmetadata = () => r(a.duration); })""")
    assert duration >= 1.0, f"the recorded clip plays ({duration} s)"
    ok("an audio file and a microphone recording (meter, timer, playable clip) go to the speech adapter")


def test_transcribe_view(page):
    page.click("#open-transcribe")
    page.click("#transcribe-record")
    expect(page.locator("#transcribe-rec-time")).to_have_text("0:01", timeout=10_000)
    page.click("#transcribe-rec-stop")
    expect(page.locator("#transcribe-source")).to_contain_text("recording.wav")
    page.click("#transcribe-run")
    expect(page.locator("#transcribe-run")).to_be_enabled(timeout=TIMEOUT_MS)
    expect(page.locator("#transcript")).not_to_have_text("Transcribing…")
    wav = base64.b64decode(page.evaluate("""async () => {
        const r = await fetch(document.getElementById('transcribe-preview').src);
        const b = new Uint8Array(await r.arrayBuffer());
        let s = '';
        for (let i = 0; i < b.length; i += 8192) s += String.fromCharCode(...b.subarray(i, i + 8192));
        return btoa(s);
    }"""))
    assert wav[:4] == b"RIFF" and len(wav) > 32000, "the recording is a WAV of a second or more"
    direct = api("/v1/audio/transcriptions", raw=multipart(wav, {"model": MODEL, "response_format": "verbose_json"}), content_type=f"multipart/form-data; boundary={BOUNDARY}")
    want = "\n".join(s["text"].strip() for s in direct["segments"])
    assert page.inner_text("#transcript").strip() == want.strip(), (page.inner_text("#transcript"), want)
    with page.expect_download() as dl:
        page.click("#download-srt")
    srt = open(dl.value.path()).read()
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0"), srt
    page.check("#translate")
    page.select_option("#translate-to", "French")
    page.click("#transcribe-run")
    expect(page.locator("#translation-block")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#transcribe-run")).to_be_enabled(timeout=TIMEOUT_MS)
    prompt = "Transcribe the audio to text, and then translate the audio to French. Use <sep> as a separator between the original transcript and the translation."
    sep = api("/v1/audio/transcriptions", raw=multipart(wav, {"model": MODEL, "response_format": "verbose_json", "prompt": prompt}), content_type=f"multipart/form-data; boundary={BOUNDARY}")
    halves = [s["text"].split("<sep>", 1) for s in sep["segments"]]
    assert page.inner_text("#transcript").strip() == "\n".join(h[0].strip() for h in halves).strip(), (page.inner_text("#transcript"), halves)
    translations = "\n".join(h[1].strip() for h in halves if len(h) > 1)
    assert page.inner_text("#translation").strip() == (translations or "(the reply had no <sep>, so no translation could be split from it)"), page.inner_text("#translation")
    print(f"  transcript {want[:60]!r}…; with the <sep> prompt {sep['text'][:60]!r}…")
    with page.expect_download() as dl:
        page.click("#download-txt")
    assert open(dl.value.path()).read().strip().startswith(page.inner_text("#transcript").strip().split("\n")[0])
    page.screenshot(path=os.path.join(SHOTS, "transcribe.png"))
    ok("the transcribe view records from the microphone; its transcript is the server's for the same bytes; .srt/.txt download; translate sends the <sep> prompt")


def test_stop(page):
    page.click("#new-chat")
    set_settings(page, max_tokens=20000)
    page.fill("#input", "Write a very long story.")
    page.press("#input", "Enter")
    expect(page.locator("#stop")).to_be_visible()
    deadline = time.time() + 30
    while running() < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert running() >= 1, "the request runs on the server"
    expect(last_assistant(page).locator(".bubble")).not_to_be_empty(timeout=TIMEOUT_MS)
    page.keyboard.press("Escape")
    wait_idle(page)
    deadline = time.time() + 10
    while running() > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert running() == 0, "the server stopped running it"
    expect(last_assistant(page).locator(".stats")).to_contain_text("stopped")
    set_settings(page, max_tokens=12)
    ok("Esc stops a streaming reply and the server's running count drops to 0")


def test_edit_regenerate_reload(page):
    page.click("#new-chat")
    send(page, "First question")
    first = stored(page)["messages"][1]["text"]
    page.click(".msg.assistant >> text=Regenerate")
    wait_idle(page)
    conv = stored(page)
    assert len(conv["messages"]) == 2 and conv["messages"][1]["text"] == first, "regenerate at temperature 0 gives the same answer in place"
    page.click(".msg.user >> text=Edit")
    page.fill(".msg.user .edit textarea", "Second question")
    page.click("text=Save & send")
    wait_idle(page)
    conv = stored(page)
    assert [m["text"] for m in conv["messages"] if m["role"] == "user"] == ["Second question"], conv
    assert conv["messages"][1]["text"] == expected_reply([{"role": "user", "content": "Second question"}], 12)
    titles = page.locator("#conversations .open").all_inner_texts()
    page.reload()
    expect(page.locator("#model-name")).to_have_text(MODEL, timeout=TIMEOUT_MS)
    expect(page.locator("#conversations .open")).to_have_count(len(titles))
    expect(page.locator(".msg.user .bubble")).to_have_text("Second question")
    page.click(f"#conversations li:has-text('Hello') .open")
    expect(page.locator(".msg.user .media img")).to_have_count(2)
    with page.expect_download() as dl:
        page.click("#export")
    data = json.load(open(dl.value.path()))
    assert data["format"] == "phi4mm-conversations" and len(data["conversations"]) == len(titles)
    n = len(titles)
    page.click("#conversations li:has-text('First question') .delete")
    expect(page.locator("#conversations .open")).to_have_count(n - 1)
    ok("regenerate, edit and resend; conversations survive a reload; export and delete")


HOSTILE = """Here is **markdown**, a table, code and maths.

| a | b |
|---|---|
| 1 | 2 |

```python
def f(x):
    return x ** 2
```

Inline $x^2 + y^2 = z^2$ and display:

$$\\int_0^1 x\\,dx = \\frac{1}{2}$$

<script>window.__pwned = 1</script>
<img src="x" onerror="window.__pwned = 2">
[a link](javascript:window.__pwned=3) and <a href="javascript:window.__pwned=4">another</a>
<iframe src="javascript:window.__pwned=5"></iframe><svg><script>window.__pwned=6</script></svg>
"""


def test_sanitiser_and_rendering(page, tmp):
    conv = {"id": "hostile", "title": "Hostile reply", "created": 1, "updated": 1,
            "messages": [{"role": "user", "text": "show me"}, {"role": "assistant", "text": HOSTILE}]}
    path = os.path.join(tmp, "hostile.json")
    json.dump({"format": "phi4mm-conversations", "version": 1, "conversations": [conv]}, open(path, "w"))
    page.set_input_files("#import", path)
    page.click("#conversations >> text=Hostile reply")
    bubble = last_assistant(page).locator(".bubble")
    expect(bubble.locator("table td")).to_have_count(2)
    expect(bubble.locator("code.hljs .hljs-keyword").first).to_have_text("def")
    expect(bubble.locator("pre .copy")).to_have_count(1)
    expect(bubble.locator(".katex")).to_have_count(2)
    assert bubble.locator("script, iframe, [onerror]").count() == 0
    hrefs = bubble.locator("a").evaluate_all("as => as.map(a => a.getAttribute('href') || '')")
    assert not any(h.strip().lower().startswith("javascript:") for h in hrefs), hrefs
    for a in bubble.locator("a").all():
        a.click()
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None, "nothing in the reply ran"
    page.screenshot(path=os.path.join(SHOTS, "rendering.png"))
    ok("markdown, tables, highlighted code with copy, KaTeX; <script>, onerror and javascript: links are inert")


def test_errors(page):
    page.click("#new-chat")
    hand_over(page, "paste", "input", "broken.png", bytes([137, 80, 78, 71, 1, 2, 3]))
    send(page, "What is this?")
    err = page.locator(".msg.error .bubble")
    expect(err).to_contain_text("image")
    page.click("#new-chat")
    set_settings(page, max_tokens=10_000_000)
    send(page, "Hi")
    expect(page.locator(".msg.error .bubble").last).to_contain_text("context")
    set_settings(page, max_tokens=12)
    page.click("#new-chat")
    page.evaluate("localStorage.setItem('phi4mm.apiKey', 'wrong-key')")
    page.fill("#input", "Hi")
    page.press("#input", "Enter")
    expect(page.locator("#key-dialog")).to_be_visible()
    page.click("#key-dialog .cancel")
    wait_idle(page)
    expect(page.locator(".msg.error .bubble").last).to_contain_text("API key")
    page.evaluate(f"localStorage.setItem('phi4mm.apiKey', {json.dumps(KEY)})")
    ok("a corrupt image, a request too long and a wrong key show the server's error in the conversation")


def test_theme_and_phone(page):
    page.click("#new-chat")
    page.click("#conversations li:has-text('Hello') .open")
    page.click("#theme")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert page.evaluate("document.getElementById('hl-light').disabled") is True
    page.screenshot(path=os.path.join(SHOTS, "chat-dark.png"))
    page.set_viewport_size({"width": 390, "height": 800})
    expect(page.locator("#toggle-sidebar")).to_be_visible()
    page.wait_for_timeout(400)  # the list slides away (0.2 s)
    assert page.locator("#sidebar").bounding_box()["x"] < 0, "the list is off screen on a phone"
    page.screenshot(path=os.path.join(SHOTS, "phone.png"))
    page.click("#toggle-sidebar")
    page.wait_for_timeout(300)
    assert page.locator("#sidebar").bounding_box()["x"] >= 0
    page.click("#new-chat")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"nothing wider than the phone ({width} px)"
    page.set_viewport_size({"width": 1200, "height": 800})
    page.click("#theme")
    assert page.evaluate("document.documentElement.dataset.theme") == "light"
    ok("dark theme, and a phone-width layout with the list behind a button")


def main():
    os.makedirs(SHOTS, exist_ok=True)
    mic = os.path.realpath(os.path.join(FIX, "audio/speech_1s_16k.wav"))  # Chromium reads no path with ..
    args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 800})
        context.grant_permissions(["microphone"], origin=BASE)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        failed_requests = []
        page.on("requestfailed", lambda r: failed_requests.append(r.url) if not r.url.startswith(BASE) else None)
        outside = []
        page.on("request", lambda r: outside.append(r.url) if not (r.url.startswith(BASE) or r.url.startswith("data:") or r.url.startswith("blob:")) else None)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        test_key_prompt_and_model(page)
        test_settings(page)
        test_text_chat(page)
        test_images(page)
        test_audio_file_and_microphone(page)
        test_transcribe_view(page)
        test_stop(page)
        test_edit_regenerate_reload(page)
        test_sanitiser_and_rendering(page, SHOTS)
        test_errors(page)
        test_theme_and_phone(page)
        assert not outside, f"requests left the server's origin: {outside}"
        assert not errors, f"the page threw: {errors}"
        ok("no request left the page's origin and no script error was thrown")
        browser.close()
    print(f"all passed ({len(PASSED)} checks)")


if __name__ == "__main__":
    main()
