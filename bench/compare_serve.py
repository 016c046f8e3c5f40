#!/usr/bin/env python3
"""Serving side by side: `phi4mm serve` against llama.cpp's `llama-server -np 8` on the same
Q4_0 decoder weights, under one load script (bench/serve_load.py), and the server's overhead
against its own scheduler (`phi4mm bench --concurrency`).

    python3 bench/compare_serve.py MODEL_DIR [--work ~/.cache/phi4mm-bench] [--threads 2]
        [--clients 1,4,8] [--requests 1] [--max-tokens 64] [--prompt-words 100] [--np 8]
        [--rounds 1] [--prepare-share F] [--engines llama-server,phi4mm] [--json-out PATH]

It reuses compare_llamacpp.py's steps (the llama.cpp build from the llama-cpp-python sdist, which
includes the `llama-server` target; the BF16 GGUF; llama-quantize to Q4_0; the load check) and
phi4mm's own Q4_0 file (`phi4mm quantize`), all under --work. Then, per round, one server at a
time on a loopback port, each loaded with the decoder only:

- `phi4mm serve --model Q4DIR --text-only --threads T --max-seqs NP`
- `llama-server -m Q4_0.gguf -np NP -c NP*CTX -t T` (CTX: prompt + tokens, rounded up)

and bench/serve_load.py against each at every --clients level (--requests each): aggregate tok/s
(generated tokens / wall time), TTFT and ITL p50/p99; then one wave of C = the most clients with
one request each. `phi4mm bench --json --text-only --concurrency C --prompt-tokens P
--gen-tokens N` (P the prompt length the server reported) runs the same wave on the scheduler
without HTTP: the server's overhead is the wave's tok/s through HTTP over the bench's
C x N / wall time. Prints the tables; best of --rounds.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_llamacpp as base  # noqa: E402
import serve_load  # noqa: E402


def wait_ready(url, proc, limit_s=900):
    t0 = time.time()
    while time.time() - t0 < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited (rc {proc.returncode}) before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return time.time() - t0
        except Exception:  # not listening or still loading (503)
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} was not ready in {limit_s} s")


def load(a, url, clients):
    """serve_load's levels against `url` (its own functions, so both servers see the same load),
    then one wave: the most clients with one request each, all sent at once (the shape of
    `phi4mm bench --concurrency`)."""
    la = argparse.Namespace(url=url, requests=a.requests, max_tokens=a.max_tokens, model=None, api_key="none")
    prompt = serve_load.prompt_text(a.prompt_words)
    serve_load.one(la, "warm-up. " + prompt)
    levels = [serve_load.level(la, c, prompt) for c in clients]
    wave = serve_load.level(argparse.Namespace(**{**vars(la), "requests": 1}), max(clients), prompt)
    return levels, wave


def run_server(name, cmd, port, a, clients, logbase):
    base.log(f"{name}: {' '.join(cmd)}")
    with open(logbase + ".log", "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        try:
            ready_s = wait_ready(f"http://127.0.0.1:{port}", proc)
            base.log(f"{name}: ready in {ready_s:.0f} s")
            before = base.cpu_busy_s()
            t0 = time.time()
            levels, wave = load(a, f"http://127.0.0.1:{port}", clients)
            wall = time.time() - t0
            after = base.cpu_busy_s()
            busy = after - before if after is not None and before is not None else None
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    for lv in levels + [wave]:
        base.log(f"  {name} {lv['clients']} clients x {lv['requests'] // lv['clients']}: {lv['tok_s']:.2f} tok/s, "
                 f"TTFT p50 {lv['ttft_p50_ms']:.0f} ms, ITL p50 {lv['itl_p50_ms']:.0f} ms, errors {len(lv['errors'])}")
    return {"engine": name, "cmd": cmd, "levels": levels, "wave": wave, "wall_s": wall, "cores_busy": busy / wall if busy is not None else None}


def best_levels(runs, engine, clients):
    """Per client count, the run with the highest tok/s."""
    out = {}
    for c in clients:
        cands = [lv for r in runs if r["engine"] == engine for lv in r["levels"] if lv["clients"] == c and not lv["errors"]]
        out[c] = max(cands, key=lambda lv: lv["tok_s"]) if cands else None
    return out


def tables(a, runs, bench, clients):
    ph, ll = best_levels(runs, "phi4mm", clients), best_levels(runs, "llama-server", clients)
    f = lambda lv, k, spec: format(lv[k], spec) if lv else "n/a"  # noqa: E731
    lines = [f"### Serving Q4_0: {a.threads} threads, {a.requests} request(s) per client, ~{a.prompt_words}-word prompt, "
             f"{a.max_tokens} tokens each, best of {a.rounds}", "",
             "| clients | llama-server tok/s | phi4mm tok/s | phi4mm / llama-server "
             "| TTFT p50 / p99 ms (llama) | TTFT p50 / p99 ms (phi4mm) | ITL p50 / p99 ms (llama) | ITL p50 / p99 ms (phi4mm) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in clients:
        x, y = ph[c], ll[c]
        ratio = f"{x['tok_s'] / y['tok_s']:.2f}x" if x and y else "n/a"
        lines.append(f"| {c} | {f(y, 'tok_s', '.2f')} | {f(x, 'tok_s', '.2f')} | {ratio} | "
                     f"{f(y, 'ttft_p50_ms', '.0f')} / {f(y, 'ttft_p99_ms', '.0f')} | "
                     f"{f(x, 'ttft_p50_ms', '.0f')} / {f(x, 'ttft_p99_ms', '.0f')} | {f(y, 'itl_p50_ms', '.0f')} / "
                     f"{f(y, 'itl_p99_ms', '.0f')} | {f(x, 'itl_p50_ms', '.0f')} / {f(x, 'itl_p99_ms', '.0f')} |")
    n = max(clients)
    waves = [r["wave"]["tok_s"] for r in runs if r["engine"] == "phi4mm" and not r["wave"]["errors"]]
    sched = [n * b["gen_tokens"] / b["wall_s"] for b in bench if b.get("wall_s")]
    if waves and sched:
        http, own = max(waves), max(sched)
        lines += ["", f"Server overhead, one wave of {n} requests sent at once: {http:.2f} tok/s through HTTP against "
                      f"{own:.2f} tok/s from `phi4mm bench --concurrency {n}` with the same prompt length and tokens "
                      f"({n} x {bench[0]['gen_tokens']} tokens / its wall time) = {http / own:.1%}"]
    lines += ["", "Cores busy during each load (server + load script + anything else): " +
              ", ".join(f"{r['engine']} {r['cores_busy']:.2f}" for r in runs if r.get("cores_busy") is not None)]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "phi4mm-bench"))
    ap.add_argument("--llama-cpp-python-version", default=base.LLAMA_CPP_PYTHON_VERSION)
    ap.add_argument("--llama-bin", metavar="DIR", help="a folder with llama-bench, llama-quantize, llama-batched-bench, llama-server")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--phi4mm", default=os.path.join(base.ROOT, "target", "release", "phi4mm"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=1, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--np", type=int, default=8, help="llama-server -np and phi4mm serve --max-seqs")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--port", type=int, default=18181)
    ap.add_argument("--prepare-share", type=float, help="phi4mm serve / bench --prepare-share (default: phi4mm's own)")
    ap.add_argument("--engines", default="llama-server,phi4mm")
    ap.add_argument("--tokenizer-pre", default="gpt-4o")
    ap.add_argument("--quantize-pure", action="store_true")
    ap.add_argument("--json-out", metavar="PATH")
    a = ap.parse_args()
    a.model = os.path.abspath(a.model)
    a.work = os.path.abspath(os.path.expanduser(a.work))
    clients = sorted({int(x) for x in a.clients.split(",") if x.strip()})
    if not clients or min(clients) < 1 or max(clients) > a.np:
        ap.error(f"--clients: positive counts up to --np {a.np}")
    cfg, logdir, bins, bf16 = base.prepare_llamacpp(ap, a)
    gguf = base.ensure_quant(a, bins, bf16, "Q4_0", logdir)
    base.check_gguf(a, bins, gguf, cfg, logdir)
    q4 = base.ensure_phi4mm_quant(a, "q4_0")
    ctx = 256 * -(-(a.prompt_words * 3 + a.max_tokens + 64) // 256)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs, bench = [], []
    engines = {e.strip() for e in a.engines.split(",")}
    share = ["--prepare-share", str(a.prepare_share)] if a.prepare_share else []
    for rnd in range(a.rounds):
        lb = os.path.join(logdir, f"{stamp}-serve-r{rnd}")
        if "llama-server" in engines:
            cmd = [bins["llama-server"], "-m", gguf, "-np", str(a.np), "-c", str(a.np * ctx), "-t", str(a.threads), "--host", "127.0.0.1", "--port", str(a.port)]
            runs.append(run_server("llama-server", cmd, a.port, a, clients, lb + "-llamacpp"))
        if "phi4mm" not in engines:
            continue
        cmd = [a.phi4mm, "serve", "--model", q4, "--text-only", "--threads", str(a.threads), "--max-seqs", str(a.np), "--host", "127.0.0.1", "--port", str(a.port), "--no-ui"]
        runs.append(run_server("phi4mm", cmd + share, a.port, a, clients, lb + "-phi4mm"))
        prompt = next((lv["prompt_tokens"] for lv in runs[-1]["levels"] if lv.get("prompt_tokens")), a.prompt_words * 2)
        cmd = [a.phi4mm, "bench", "--json", "--model", q4, "--threads", str(a.threads), "--text-only", "--prompt-tokens", str(prompt),
               "--gen-tokens", str(a.max_tokens), "--concurrency", str(max(clients))] + share
        got = base.run_phi4mm_json(cmd, lb + "-bench")
        if got is not None:
            bench.append(got[0])
            base.log(f"  phi4mm bench --concurrency {max(clients)}: {max(clients) * a.max_tokens / got[0]['wall_s']:.2f} tok/s "
                     f"(wall {got[0]['wall_s']:.1f} s, TTFT p50 {got[0]['ttft_s_p50']:.1f} s, ITL p50 {1e3 * got[0]['itl_s_p50']:.0f} ms)")
    print(tables(a, runs, bench, clients) + "\n", flush=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"model": a.model, "gguf": gguf, "phi4mm_q4": q4, "threads": a.threads, "clients": clients, "requests": a.requests,
                       "max_tokens": a.max_tokens, "prompt_words": a.prompt_words, "runs": runs, "bench": bench}, f, indent=1)


if __name__ == "__main__":
    main()
