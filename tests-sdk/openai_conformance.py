"""The official `openai` Python SDK against a running `phi4mm serve` on the tiny checkpoint.

Usage: python openai_conformance.py BASE_URL API_KEY FIXTURES_DIR
Exits non-zero on the first failed check (an AssertionError or an unexpected SDK exception).
"""
import base64
import json
import sys

import openai
from openai import OpenAI

base, key, fixtures = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
MODEL = "microsoft/Phi-4-multimodal-instruct"
GREEDY = dict(model=MODEL, temperature=0, max_tokens=8, extra_body={"ignore_eos": True})


def b64(path):
    with open(f"{fixtures}/{path}", "rb") as f:
        return base64.b64encode(f.read()).decode()


def check(name, fn):
    fn()
    print(f"ok  {name}")


def models():
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL, "vision", "speech"], ids


def chat():
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Tell me about Rust."}], logprobs=True, top_logprobs=3, **GREEDY)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.finish_reason == "length", r
    assert isinstance(c.message.content, str) and c.message.role == "assistant"
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8, r.usage
    lp = c.logprobs.content
    assert len(lp) == 8 and all(len(t.top_logprobs) == 3 for t in lp), lp
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob for t in lp)
    joined = b"".join(bytes(t.bytes) for t in lp).decode("utf-8", errors="replace")
    assert joined == c.message.content, (joined, c.message.content)
    return c.message.content, r.usage


def stream():
    whole, usage = chat()
    parts, last, finishes = [], None, []
    with client.chat.completions.create(messages=[{"role": "user", "content": "Tell me about Rust."}], stream=True, stream_options={"include_usage": True}, **GREEDY) as s:
        for chunk in s:
            last = chunk
            for ch in chunk.choices:
                if ch.delta.content:
                    parts.append(ch.delta.content)
                if ch.finish_reason:
                    finishes.append(ch.finish_reason)
    assert "".join(parts) == whole, ("".join(parts), whole)
    assert finishes == ["length"], finishes
    assert last.choices == [] and last.usage.completion_tokens == usage.completion_tokens, last


def image_and_audio():
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64("images/wide_500x300.png")}},
        {"type": "input_audio", "input_audio": {"data": b64("audio/speech_1s_16k.wav"), "format": "wav"}},
        {"type": "text", "text": "Answer the spoken question about the image."},
    ]
    r = client.chat.completions.create(messages=[{"role": "user", "content": content}], **GREEDY)
    assert r.usage.prompt_tokens > 100 and r.usage.completion_tokens == 8, r.usage


def completions():
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, echo=True, logprobs=2, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text.startswith("Once upon a time") and len(c.logprobs.tokens) == 5, c


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def tools():
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=3, max_tokens=100)
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    call = c.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_"), call
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f") and len(args["city"]) <= 12, args
    # Streamed: the SDK's own accumulator rebuilds the same call from the deltas.
    with client.chat.completions.stream(**kw) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    sc = final.choices[0]
    assert sc.finish_reason == "tool_calls", sc
    assert [(t.function.name, t.function.arguments) for t in sc.message.tool_calls] == [(call.function.name, call.function.arguments)], sc
    # The result goes back as a `tool` message.
    follow = ASK + [c.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r2 = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, max_tokens=4, temperature=0)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens, r2.usage


def json_schema():
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "ok": {"type": "boolean"}}, "required": ["name", "ok"], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A fruit as JSON."}], temperature=1.0, seed=1, max_tokens=60,
                                       response_format={"type": "json_schema", "json_schema": {"name": "fruit", "schema": schema, "strict": True}})
    out = json.loads(r.choices[0].message.content)
    assert set(out) == {"name", "ok"} and isinstance(out["ok"], bool) and len(out["name"]) <= 10, out


def transcriptions():
    path = f"{fixtures}/audio/speech_45s_16k.wav"
    with open(path, "rb") as f:
        audio = f.read()
    j = client.audio.transcriptions.create(model=MODEL, file=("a.wav", audio), extra_body={"max_completion_tokens": 4})
    assert isinstance(j.text, str), j
    t = client.audio.transcriptions.create(model=MODEL, file=("a.wav", audio), response_format="text", extra_body={"max_completion_tokens": 4})
    assert t.strip() == j.text, (t, j.text)
    v = client.audio.transcriptions.create(model=MODEL, file=("a.wav", audio), response_format="verbose_json", extra_body={"max_completion_tokens": 4})
    assert abs(v.duration - 45.0) < 0.01 and [(s.start, s.end) for s in v.segments] == [(0.0, 40.0), (40.0, v.duration)], v
    for fmt, head in [("srt", "1\n00:00:00,000 --> "), ("vtt", "WEBVTT")]:
        out = client.audio.transcriptions.create(model=MODEL, file=("a.wav", audio), response_format=fmt, extra_body={"max_completion_tokens": 4})
        assert out.startswith(head) or not j.text, (fmt, out)
    tr = client.audio.translations.create(model=MODEL, file=("a.wav", audio), extra_body={"max_completion_tokens": 4})
    assert isinstance(tr.text, str), tr
    try:
        client.audio.transcriptions.create(model=MODEL, file=("a.wav", b"RIFFjunk"))
    except openai.BadRequestError as e:
        assert e.body.get("param") == "file", e.body
    else:
        raise AssertionError("a corrupt audio file should raise BadRequestError")


def errors():
    for kwargs, cls in [
        (dict(temperature=5), openai.BadRequestError),
        (dict(model="no-such-model"), openai.NotFoundError),
        (dict(max_tokens=10_000_000), openai.BadRequestError),
    ]:
        args = {**GREEDY, **kwargs}
        try:
            client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **args)
        except cls as e:
            assert e.body and e.body.get("message"), e.body
        else:
            raise AssertionError(f"{kwargs} should raise {cls.__name__}")
    bad = OpenAI(base_url=base, api_key="wrong-key", max_retries=0)
    try:
        bad.models.list()
    except openai.AuthenticationError:
        pass
    else:
        raise AssertionError("a wrong key should raise AuthenticationError")
    try:
        client.chat.completions.create(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"junk").decode()}}]}], **GREEDY)
    except openai.BadRequestError as e:
        assert "image" in e.body["message"], e.body
    else:
        raise AssertionError("a corrupt image should raise BadRequestError")


for name, fn in [("models", models), ("chat + logprobs", chat), ("stream + usage", stream), ("image + audio parts", image_and_audio), ("completions", completions), ("tools (whole and streamed)", tools),
                 ("json_schema", json_schema), ("transcriptions and translations", transcriptions), ("errors as SDK exceptions", errors)]:
    check(name, fn)
print("openai SDK conformance: all passed")
