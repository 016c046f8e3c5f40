#!/usr/bin/env python3
"""Side-by-side CPU benchmark: phi4mm against transformers on the same checkpoint.

    python3 bench/compare_transformers.py MODEL_DIR --python /path/to/venv/bin/python
        [--dtype bf16|f32] [--threads 2] [--prompt-tokens 128] [--gen-tokens 32] [--rounds 2]
        [--image PATH] [--audio PATH]

Runs `phi4mm bench --json` and `reference/bench_transformers.py` alternately (`--rounds` times
each, one engine at a time, never both at once) and prints, per engine, the best prefill and
decode tokens/s, the peak RSS, and phi4mm's ratio to transformers. MODEL_DIR is a checkpoint in
the official hub layout, e.g. the full-size random one from `reference/make_full.py`. The python
given by --python needs torch and transformers (reference/requirements.txt); build phi4mm first
with `cargo build --release -p phi4mm-cli`.

--image PATH is passed to both (`phi4mm bench --image`, `bench_transformers.py --image`; not with
--decoder-only) and adds a second table: per engine the best (lowest) image preprocessing, image
encode (SigLIP tower + HD assembly + projector) and time-to-first-token seconds for the model card
prompt `<|image_1|>What is shown in this image?`, and the speedup = transformers time / phi4mm time.

--audio PATH (a 16 kHz WAV, checked here before anything runs) is passed to both (`phi4mm bench
--audio`, `bench_transformers.py --audio`; not with --decoder-only; the text part still runs for
both) and adds an audio table: per engine the best (lowest) feature extraction (file read + log-mel)
and speech encode (Conformer + speech projector) seconds and real-time factor (encode s / audio s),
and the speedup = transformers / phi4mm.
"""
import argparse
import json
import os
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(cmd, env):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def wav_rate(path):
    """Sample rate from the RIFF/WAVE header (fmt chunk), or None if PATH is not a WAV file."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            ch = f.read(8)
            if len(ch) < 8:
                return None
            cid, size = ch[:4], struct.unpack("<I", ch[4:])[0]
            if cid == b"fmt ":
                fmt = f.read(8)
                return struct.unpack("<I", fmt[4:8])[0] if len(fmt) == 8 else None
            f.seek(size + (size & 1), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--phi4mm", default=os.path.join(ROOT, "target", "release", "phi4mm"))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--decoder-only", action="store_true",
                    help="transformers loads only the decoder (needed for f32 in 24 GiB)")
    ap.add_argument("--image", metavar="PATH",
                    help="also compare image encode time and time to first token for this image")
    ap.add_argument("--audio", metavar="PATH",
                    help="also compare feature extraction, speech encode time and real-time factor for this 16 kHz WAV")
    a = ap.parse_args()
    if a.image and a.decoder_only:
        ap.error("--image needs transformers' vision encoder: it cannot be combined with --decoder-only")
    if a.audio:
        if a.decoder_only:
            ap.error("--audio needs transformers' audio encoder: it cannot be combined with --decoder-only")
        if not os.path.isfile(a.audio):
            ap.error(f"--audio: no such file: {a.audio}")
        rate = wav_rate(a.audio)
        if rate != 16000:
            ap.error(f"--audio: {a.audio} is " + ("not a WAV file" if rate is None else f"a WAV at {rate} Hz")
                     + "; a 16 kHz WAV is expected")

    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    common = ["--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens)]
    ours = [a.phi4mm, "bench", "--model", a.model, "--dtype", a.dtype, "--threads", str(a.threads), "--json"] + common
    theirs = [a.python, os.path.join(ROOT, "reference", "bench_transformers.py"), a.model,
              "--dtype", a.dtype, "--threads", str(a.threads)] + common
    if a.decoder_only:
        theirs.append("--decoder-only")
    if a.image:
        ours += ["--image", a.image]
        theirs += ["--image", a.image]
    if a.audio:
        ours += ["--audio", a.audio]
        theirs += ["--audio", a.audio]

    results = {"phi4mm": [], "transformers": []}
    for _ in range(a.rounds):
        results["phi4mm"].append(run_json(ours, env))
        results["transformers"].append(run_json(theirs, env))

    best = {}
    for name, runs in results.items():
        best[name] = {
            "prefill": max(r["prefill_tok_s"] for r in runs),
            "decode": max(r["decode_tok_s"] for r in runs),
            "rss": max(r["peak_rss_mib"] for r in runs),
        }
    print(f"\n{a.dtype}, {a.threads} threads, prompt {a.prompt_tokens}, gen {a.gen_tokens}, "
          f"best of {a.rounds} alternating rounds")
    print(f"{'engine':<14}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak RSS MiB':>14}")
    for name, b in best.items():
        print(f"{name:<14}{b['prefill']:>15.2f}{b['decode']:>14.2f}{b['rss']:>14.0f}")
    o, t = best["phi4mm"], best["transformers"]
    print(f"{'ratio':<14}{o['prefill'] / t['prefill']:>14.2f}x{o['decode'] / t['decode']:>13.2f}x"
          f"{o['rss'] / t['rss']:>13.2f}x")
    if a.image:
        print_image_table(a.image, results)
    if a.audio:
        print_audio_table(a.audio, results)
    print(json.dumps({"runs": results}))


def print_image_table(path, results):
    """Best (lowest) seconds per engine for the image numbers, and transformers / phi4mm."""
    keys = [("preprocess_s", "preprocess s"), ("image_encode_s", "encode s"), ("ttft_s", "TTFT s")]
    best, shape = {}, {}
    for name, runs in results.items():
        imgs = [r.get("image") for r in runs]
        if any(i is None for i in imgs):
            print(f"\n{name} reported no image numbers", file=sys.stderr)
            return
        best[name] = {k: min(i[k] for i in imgs) for k, _ in keys}
        shape[name] = (imgs[0]["crops"], imgs[0]["image_tokens"], imgs[0]["prompt_tokens"])
    crops, img_tok, prompt_tok = shape["phi4mm"]
    print(f"\nimage {path}: {crops} crops (incl. global), {img_tok} image tokens, {prompt_tok} prompt tokens")
    if shape["transformers"] != shape["phi4mm"]:
        print(f"warning: transformers reports crops/image tokens/prompt tokens {shape['transformers']}, "
              f"phi4mm {shape['phi4mm']}")
    print(f"{'engine':<14}" + "".join(f"{label:>15}" for _, label in keys))
    for name, b in best.items():
        print(f"{name:<14}" + "".join(f"{b[k]:>15.3f}" for k, _ in keys))
    o, t = best["phi4mm"], best["transformers"]
    print(f"{'speedup':<14}" + "".join(f"{t[k] / o[k]:>14.2f}x" if o[k] > 0 else f"{'-':>15}" for k, _ in keys))



def print_audio_table(path, results):
    """Best (lowest) seconds / real-time factor per engine for the audio numbers, and transformers / phi4mm."""
    keys = [("features_s", "features s"), ("encode_s", "encode s"), ("rtf", "RTF")]
    best, shape = {}, {}
    for name, runs in results.items():
        auds = [r.get("audio") for r in runs]
        if any(x is None for x in auds):
            print(f"\n{name} reported no audio numbers", file=sys.stderr)
            return
        best[name] = {k: min(x[k] for x in auds) for k, _ in keys}
        shape[name] = (auds[0]["seconds"], auds[0]["audio_tokens"])
    seconds, tokens = shape["phi4mm"]
    print(f"\naudio {path}: {seconds:.2f} s, {tokens} audio tokens")
    if shape["transformers"][1] != tokens:
        print(f"warning: transformers reports {shape['transformers'][1]} audio tokens, phi4mm {tokens}")
    print(f"{'engine':<14}" + "".join(f"{label:>15}" for _, label in keys))
    for name, b in best.items():
        print(f"{name:<14}" + "".join(f"{b[k]:>15.4f}" for k, _ in keys))
    o, t = best["phi4mm"], best["transformers"]
    print(f"{'speedup':<14}" + "".join(f"{t[k] / o[k]:>14.2f}x" if o[k] > 0 else f"{'-':>15}" for k, _ in keys))


if __name__ == "__main__":
    main()
