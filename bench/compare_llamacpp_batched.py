#!/usr/bin/env python3
"""Side-by-side batched decoding: phi4mm's scheduler against llama.cpp's `llama-batched-bench`
on the same decoder weights, N text streams at once.

    python3 bench/compare_llamacpp_batched.py MODEL_DIR [--work ~/.cache/phi4mm-bench]
        [--precisions q4_0,bf16] [--threads 2] [--npp 128] [--ntg 64] [--npl 1,2,4,8]
        [--rounds 1] [--json-out PATH]

It reuses compare_llamacpp.py's steps 1-4 (the llama.cpp build from the llama-cpp-python sdist,
now with the `llama-batched-bench` target; the GGUF; llama-quantize; the load check) and phi4mm's
own quantised copy, all under --work. Then, per precision and round, one engine at a time:

- llama.cpp: `llama-batched-bench -m FILE -c C -b 2048 -ub 512 -npp P -ntg N -npl LIST -t T
  --output-format jsonl` (C = 512 per sequence of the largest batch); each line's `speed_tg`
  (S_TG: the batch's generated tokens / generation time) is its aggregate decode tok/s.
- phi4mm: `phi4mm bench --json --text-only --threads T --prompt-tokens P --gen-tokens N
  --concurrency B` for each B in LIST: `aggregate_decode_tok_s` (the tokens of the steps where
  all B streams decoded / those steps' time).

Both run random-token prompts of P tokens per stream, decode N tokens per stream, and time the
decode phase with every stream active. It prints a table: B, llama.cpp S_TG, phi4mm aggregate,
phi4mm / llama.cpp; best of --rounds.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_llamacpp as base  # noqa: E402


def bench_llama(a, bins, path, npl, logbase):
    ctx = 512 * max(npl)
    cmd = [bins["llama-batched-bench"], "-m", path, "-c", str(ctx), "-b", "2048", "-ub", "512",
           "-npp", str(a.npp), "-ntg", str(a.ntg), "-npl", ",".join(map(str, npl)), "-t", str(a.threads),
           "--output-format", "jsonl"]
    rc, out, err, info = base.run_measured(cmd, logbase)
    speeds = {}
    if rc != 0:
        base.log(f"llama-batched-bench failed (rc {rc}):\n{base.tail(err)}")
    for line in out.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "pl" in row and "speed_tg" in row:
            speeds[int(row["pl"])] = float(row["speed_tg"])
    return {"engine": "llama.cpp", "cmd": cmd, "rc": rc, **info, "speed_tg": speeds}


def bench_phi4mm(a, quant, npl, logbase):
    model, qargs = (a.model, ["--quant", "none"]) if quant == "none" else (base.ensure_phi4mm_quant(a, quant), [])
    speeds, infos = {}, []
    for b in npl:
        cmd = [a.phi4mm, "bench", "--json", "--model", model, "--threads", str(a.threads), "--text-only",
               "--prompt-tokens", str(a.npp), "--gen-tokens", str(a.ntg), "--concurrency", str(b)] + qargs
        got = base.run_phi4mm_json(cmd, f"{logbase}-b{b}")
        if got is not None:
            speeds[b] = got[0].get("aggregate_decode_tok_s")
            infos.append(got[1])
    load = [i["other_load"] for i in infos if i.get("other_load") is not None]
    return {"engine": "phi4mm", "quant": quant, "speed_tg": speeds, "other_load": max(load) if load else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "phi4mm-bench"))
    ap.add_argument("--llama-cpp-python-version", default=base.LLAMA_CPP_PYTHON_VERSION)
    ap.add_argument("--llama-bin", metavar="DIR", help="a folder with llama-bench, llama-quantize, llama-batched-bench")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--phi4mm", default=os.path.join(base.ROOT, "target", "release", "phi4mm"))
    ap.add_argument("--precisions", default="q4_0,bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--npp", type=int, default=128)
    ap.add_argument("--ntg", type=int, default=64)
    ap.add_argument("--npl", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tokenizer-pre", default="gpt-4o")
    ap.add_argument("--quantize-pure", action="store_true")
    ap.add_argument("--json-out", metavar="PATH")
    a = ap.parse_args()
    a.model = os.path.abspath(a.model)
    a.work = os.path.abspath(os.path.expanduser(a.work))
    npl = sorted({int(x) for x in a.npl.split(",") if x.strip()})
    precs = [p.strip().lower() for p in a.precisions.split(",") if p.strip()]
    if not npl or min(npl) < 1 or any(p not in base.PRECISIONS or p == "q4_k_m" for p in precs):
        ap.error("--npl: positive batch sizes; --precisions: bf16, q8_0, q4_0")
    cfg, logdir, bins, bf16 = base.prepare_llamacpp(ap, a)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    for p in precs:
        qtype, quant = base.PRECISIONS[p]
        path = base.ensure_quant(a, bins, bf16, qtype, logdir)
        base.check_gguf(a, bins, path, cfg, logdir)
        runs = []
        for rnd in range(a.rounds):
            lb = os.path.join(logdir, f"{stamp}-batched-{p}-r{rnd}")
            runs += [bench_llama(a, bins, path, npl, lb + "-llamacpp"), bench_phi4mm(a, quant, npl, lb + "-phi4mm")]
        best = {e: {b: max((r["speed_tg"].get(b) or 0.0 for r in runs if r["engine"] == e), default=0.0) for b in npl}
                for e in ("llama.cpp", "phi4mm")}
        lines = [f"### {p}: aggregate decode tok/s, {a.threads} threads, pp{a.npp} tg{a.ntg} per stream, best of {a.rounds}",
                 "", "| streams | llama.cpp S_TG | phi4mm aggregate | phi4mm / llama.cpp |", "|---:|---:|---:|---:|"]
        for b in npl:
            x, y = best["phi4mm"][b], best["llama.cpp"][b]
            lines.append(f"| {b} | {y:.2f} | {x:.2f} | {(x / y if y else float('nan')):.2f}x |")
        busy = [r["other_load"] for r in runs if (r.get("other_load") or 0) > base.BUSY_LOAD]
        if busy:
            lines += ["", f"Warning: other processes kept up to {max(busy):.1f} cores busy; timings unreliable."]
        print("\n".join(lines) + "\n", flush=True)
        results.append({"precision": p, "gguf": path, "best": best, "runs": runs})
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"model": a.model, "threads": a.threads, "npp": a.npp, "ntg": a.ntg, "npl": npl,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
