#!/usr/bin/env python3
"""One load script for any OpenAI-compatible server (`phi4mm serve`, `llama-server -np 8`):
C clients at once, each sending R streamed chat requests of one text prompt (each with its own
first line, so none reuses another's cached prefix), greedy, a
fixed number of generated tokens (`ignore_eos`), and the figures per client count:
aggregate generated tok/s (all tokens / wall time of the level), a stream's own decode rate
(its tokens after the first over the time from its first chunk to its last, averaged), TTFT and
ITL p50/p99 (from each stream's chunk arrival times).

    python3 bench/serve_load.py URL [--clients 1,4,8] [--requests 4] [--max-tokens 64]
        [--prompt-words 100] [--model NAME] [--api-key KEY] [--json-out PATH]

URL is the server's base, e.g. http://127.0.0.1:8080. Run it against each server in turn on
the same machine with the same weights and put the ratios side by side; stdlib only.
"""
import argparse
import json
import statistics
import threading
import time
import urllib.request


def one(a, prompt):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": a.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if a.model:
        body["model"] = a.model
    req = urllib.request.Request(a.url.rstrip("/") + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {a.api_key}"})
    start = time.perf_counter()
    stamps, tokens, prompt_tokens = [], None, None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens")
                prompt_tokens = chunk["usage"].get("prompt_tokens")
            for c in chunk.get("choices", []):
                if (c.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("a stream gave no content")
    ttft = stamps[0] - start
    itl = [b - a_ for a_, b in zip(stamps, stamps[1:])]
    n = tokens if tokens is not None else len(stamps)
    decode = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else None  # tokens after the first chunk
    return ttft, itl, n, decode, prompt_tokens


def prompt_text(words):
    """The load's prompt: about `words` words of notes to summarise."""
    return "Summarise the following notes. " + " ".join(f"note{i} about systems and engines" for i in range(words // 5))


def level(a, clients, prompt):
    results, errors = [], []

    def client(c):
        for i in range(a.requests):
            try:  # a distinct first line per request, so no request reuses another's prompt cache
                results.append(one(a, f"Request {clients}.{c}.{i}.\n{prompt}"))
            except Exception as e:  # a failed request is reported, not hidden
                errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    itl = sorted(x for r in results for x in r[1])
    pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")  # noqa: E731
    rates = [r[3] for r in results if r[3] is not None]
    return {"clients": clients, "requests": len(results), "errors": errors, "wall_s": wall,
            "tok_s": sum(r[2] for r in results) / wall,
            "stream_decode_tok_s": statistics.mean(rates) if rates else float("nan"),
            "prompt_tokens": next((r[4] for r in results if r[4] is not None), None),
            "ttft_p50_ms": 1e3 * statistics.median(ttft) if ttft else float("nan"), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "itl_p50_ms": 1e3 * statistics.median(itl) if itl else float("nan"), "itl_p99_ms": 1e3 * pct(itl, 0.99)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=100)
    p.add_argument("--model", default=None)
    p.add_argument("--api-key", default="none")
    p.add_argument("--json-out", default=None)
    a = p.parse_args()
    prompt = prompt_text(a.prompt_words)
    one(a, prompt)  # warm-up
    rows = [level(a, int(c), prompt) for c in a.clients.split(",")]
    print(f"{'clients':>7} {'tok/s':>9} {'stream':>9} {'TTFT p50':>9} {'p99':>9} {'ITL p50':>9} {'p99':>9}  errors")
    for r in rows:
        print(f"{r['clients']:>7} {r['tok_s']:>9.2f} {r['stream_decode_tok_s']:>9.2f} {r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>9.1f} {r['itl_p50_ms']:>9.1f} {r['itl_p99_ms']:>9.1f}  {len(r['errors'])}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"url": a.url, "max_tokens": a.max_tokens, "levels": rows}, f, indent=1)


if __name__ == "__main__":
    main()
