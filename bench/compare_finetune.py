#!/usr/bin/env python3
"""Side-by-side CPU benchmark of fine-tuning and evaluation on the same checkpoint.

    python3 bench/compare_finetune.py MODEL_DIR --python /path/to/venv/bin/python
        [--updates 3] [--threads 2] [--work DIR] [--clips 4] [--max-new-tokens 16] [--skip-torch]
        [--mode speech|vision] [--part train|eval|both]

Training: one speech-LoRA update per step on a 10-second clip (fixtures/audio/speech_10s_16k.wav)
with a 28-token target (or with --mode vision a vision-LoRA update on fixtures/images/hd_1280x720.png
with a question and a 10-token answer), batch 1, run `--updates` times by `phi4mm finetune` and then by
reference/bench_finetune_torch.py (PyTorch + PEFT, the official recipe's step: bf16, gradient
checkpointing, AdamW, clipping), one engine at a time. Reports each engine's update seconds (the
first update apart: it pays page faults and warm-up), peak RSS, and phi4mm's speedup.

Evaluation: `phi4mm eval --task asr` over `--clips` copies of the clip list (one load, the batching
scheduler) against `phi4mm transcribe` run once per clip (a load each, as a shell loop would),
both with greedy decoding of at most --max-new-tokens tokens; reports clips/s for each.

MODEL_DIR is a hub-layout checkpoint, e.g. the full-size random one of reference/make_full.py. Build
phi4mm first (`cargo build --release -p phi4mm-cli`); --python needs reference/requirements.txt.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHI4MM = os.path.join(ROOT, "target", "release", "phi4mm")
CLIP = os.path.join(ROOT, "fixtures", "audio", "speech_10s_16k.wav")
TEXT = ("The weather was calm this morning, so we took the early train to the coast. "
        "At noon we ate fresh bread and cheese.")
IMAGE = os.path.join(ROOT, "fixtures", "images", "hd_1280x720.png")
QUESTION = "What is shown in this image?"
ANSWER = "A picture with several coloured shapes."
EVAL_CLIPS = ["speech_10s_16k.wav", "speech_1s_16k.wav", "speech_8k.wav", "speech_48k_stereo.wav"]


def run(cmd, env):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=True, text=True).stdout
    return out, time.perf_counter() - t


def train_phi4mm(a, env, data):
    out_dir = os.path.join(a.work, "phi4mm-adapter")
    run([PHI4MM, "finetune", "-m", a.model_dir, "--mode", a.mode, "--train", data, "--out", out_dir,
         "--epochs", str(a.updates), "--batch-size", "1", "--warmup-steps", "0", "--threads", str(a.threads)], env)
    log = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return {"updates": [{"loss": r["loss"], "seconds": r["seconds"]} for r in log],
            "peak_rss_bytes": max(r["peak_rss_bytes"] or 0 for r in log)}


def train_torch(a, env, data):
    script = os.path.join(ROOT, "reference", "bench_finetune_torch.py")
    out, _ = run([a.python, script, a.model_dir, "--data", data, "--mode", a.mode, "--updates", str(a.updates),
                  "--threads", str(a.threads)], env)
    return json.loads(out.strip().splitlines()[-1])


def steady(r):
    s = [u["seconds"] for u in r["updates"]]
    return statistics.median(s[1:] if len(s) > 1 else s)


def bench_train(a, env):
    data = os.path.join(a.work, f"{a.mode}.jsonl")
    line = {"audio": CLIP, "target": TEXT} if a.mode == "speech" else {"image": IMAGE, "instruction": QUESTION, "target": ANSWER}
    with open(data, "w") as f:
        f.write(json.dumps(line) + "\n")
    results = {"phi4mm": train_phi4mm(a, env, data)}
    if not a.skip_torch:
        results["pytorch+peft"] = train_torch(a, env, data)
    what = "10 s clip" if a.mode == "speech" else "1280x720 image"
    print(f"\n{a.mode}-LoRA update, {what}, {a.threads} threads, batch 1 ({a.updates} updates each)")
    print(f"{'engine':14s} {'first s':>9s} {'update s':>9s} {'peak RSS GiB':>13s}  losses")
    for name, r in results.items():
        print(f"{name:14s} {r['updates'][0]['seconds']:9.2f} {steady(r):9.2f} {r['peak_rss_bytes'] / 2**30:13.2f}  "
              + " ".join(f"{u['loss']:.3f}" for u in r["updates"]))
    if "pytorch+peft" in results:
        print(f"phi4mm speedup per update: {steady(results['pytorch+peft']) / steady(results['phi4mm']):.2f}x")
    return results


def bench_eval(a, env):
    data = os.path.join(a.work, "eval.jsonl")
    clips = [EVAL_CLIPS[i % len(EVAL_CLIPS)] for i in range(a.clips)]
    with open(data, "w") as f:
        for c in clips:
            f.write(json.dumps({"audio": os.path.join(ROOT, "fixtures", "audio", c), "target": "x"}) + "\n")
    common = ["-m", a.model_dir, "--threads", str(a.threads), "--max-new-tokens", str(a.max_new_tokens)]
    _, t_eval = run([PHI4MM, "eval", "--task", "asr", "--data", data, "--json", *common], env)
    t_one = 0.0
    for c in clips:
        _, t = run([PHI4MM, "transcribe", *common, os.path.join(ROOT, "fixtures", "audio", c)], env)
        t_one += t
    print(f"\nevaluation of {len(clips)} clips, at most {a.max_new_tokens} tokens each, {a.threads} threads")
    print(f"phi4mm eval (one load, batched):      {t_eval:8.1f} s  {len(clips) / t_eval:.3f} clips/s")
    print(f"phi4mm transcribe, one run per clip:  {t_one:8.1f} s  {len(clips) / t_one:.3f} clips/s")
    print(f"eval speedup: {t_one / t_eval:.2f}x")
    return {"eval_s": t_eval, "transcribe_each_s": t_one, "clips": len(clips)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/phi4mm-finetune-bench")
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--part", choices=["train", "eval", "both"], default="both")
    ap.add_argument("--mode", choices=["speech", "vision"], default="speech")
    a = ap.parse_args()
    if not os.path.exists(PHI4MM):
        sys.exit(f"{PHI4MM} is missing: cargo build --release -p phi4mm-cli")
    os.makedirs(a.work, exist_ok=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    out = {}
    if a.part in ("train", "both"):
        out["train"] = bench_train(a, env)
    if a.part in ("eval", "both"):
        out["eval"] = bench_eval(a, env)
    with open(os.path.join(a.work, f"results-{a.mode}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
