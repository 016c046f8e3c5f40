#!/usr/bin/env python3
"""CPU baseline: transformers' native Phi4MultimodalForCausalLM on a hub-layout Phi-4-multimodal checkpoint.

    python reference/bench_transformers.py MODEL_DIR [--prompt-tokens 128] [--gen-tokens 32]
        [--threads 2] [--dtype bf16|f32] [--decoder-only] [--seed 0] [--image PATH] [--audio PATH]

MODEL_DIR is a directory in the official hub layout (config.json with model_type "phi4mm",
model-*-of-*.safetensors + model.safetensors.index.json), e.g. the output of reference/make_full.py.

What it does
  * builds transformers (5.23) `Phi4MultimodalForCausalLM` from the hub config.json (text values,
    longrope with partial_rotary_factor 0.75, vision config = the SigLIP defaults, audio config
    from `audio_processor.config`, T5 bias distance 500) on the meta device, so no memory is
    allocated for random init;
  * reads the shards with plain file reads (no mmap, so no file-backed pages inflate RSS) straight
    into one tensor per weight, converts hub names to native names (strip `base_layer.`, drop every
    `lora_` tensor, rename img_projection / GN / audio projection / Conformer keys as in
    design/architecture.md §7) and assigns them with load_state_dict(assign=True): one copy of the
    weights in memory, no extra one. lm_head is tied to embed_tokens. With --decoder-only the
    vision / audio encoders are not read at all (they stay on the meta device; a text-only forward
    never touches them);
  * torch.set_num_threads(threads); random prompt ids (seed); one warm-up forward of 8 tokens + 1
    decode step (touches every decoder weight once, builds kernels), then
      prefill: one forward of the whole prompt into an empty DynamicCache (logits of the last
               position only, as generate() does) -> prefill_tok_s = prompt_tokens / time;
      decode : gen_tokens greedy steps, one token each with the KV cache -> decode_tok_s =
               1 / median(step time);
  * prints ONE JSON line on stdout:
    {"engine":"transformers","dtype":...,"threads":...,"prompt_tokens":...,"gen_tokens":...,
     "prefill_tok_s":...,"decode_tok_s":...,"peak_rss_mib":...,"load_s":...}
    (peak_rss_mib = getrusage ru_maxrss of this process, whole run; load_s = model build + weight
    read), plus "image" and "audio": null, or with --image / --audio the objects described below.
    Details go to stderr.

--image PATH (not with --decoder-only: it needs the vision encoder), after the text numbers, on the
same loaded model, with the keys of `phi4mm bench --image`:
    "image": {"image": PATH, "crops": 1 + local crops, "image_tokens": ..., "prompt_tokens": ...,
              "preprocess_s": ..., "image_encode_s": ..., "ttft_s": ...}
  * preprocess_s: image file decode + the ORIGINAL processor's transform (make_vision.preprocess,
    imported, not copied: PIL bilinear HD resize, white pad, normalize, bicubic thumbnail, masks) +
    batching to image_pixel_values / image_attention_mask / image_sizes + tokenizing the prompt
    and expanding its placeholder (make_vision.expand). One run. The tokenizer (tokenizer.json of
    MODEL_DIR) is loaded before, untimed (the Rust engine loads it with the model).
  * image_encode_s: just the image encoder, i.e. the native model's image_embed (SigLIP tower +
    2x2 pool + HD assembly with sub_GN / glb_GN + projector; its final scatter into an all-placeholder
    embedding row set is negligible) on those three tensors; median of 2 runs, done right after the
    text timings (no extra warm-up).
  * ttft_s: preprocess_s + one full forward of the model card prompt
    `<|user|><|image_1|>What is shown in this image?<|end|><|assistant|>` (placeholder expanded to
    image_tokens copies of 200010) with the image inputs into an empty DynamicCache (image encode +
    prefill, last-position logits) + argmax. Like phi4mm, this is measured after image_encode_s.
  The vision LoRA is not applied (as for text, lora_* tensors are dropped). Merged into the base
  weights it would change the values but not the time; the original's unmerged adapters would add
  r=256 low-rank products to every decoder linear. The SigLIP tower runs with the model's sdpa
  attention; note that transformers 5.23's sdpa SigLIP is causal when no crop of the batch is padded
  (see README, vision fixtures): wrong values, about the same time. A warning is logged then.

--audio PATH (a 16 kHz WAV; anything else is rejected before the model loads; not with
--decoder-only: it needs the audio encoder), after the text (and image) numbers, on the same loaded
model, with the keys of `phi4mm bench --audio`:
    "audio": {"audio": PATH, "seconds": ..., "audio_tokens": ..., "features_s": ..., "encode_s": ...,
              "rtf": ..., "peak_rss_mib_before": ..., "peak_rss_mib_after": ...}
  * features_s: soundfile.read of the file (float64, as the model card loads it) + the ORIGINAL
    feature extractor (make_audio.original_features, imported, not copied: channel mean, framing,
    pre-emphasis, Hamming, rfft, SpeechLib mel, log) -> log-mel f32 [T, 80]. One run.
  * encode_s: the native speech encoder as the native model runs it for an audio-only request: the
    `audio_embed` module (Conformer + speech projector: Linear, GELU, Linear; its final scatter into
    an all-placeholder embedding row set is negligible) with audio_input_features [1, T, 80],
    audio_embed_sizes [ceil(T/8)], audio_attention_mask None, projection mode "speech". One run
    (audio can be long), right after the text / image timings, no extra warm-up.
  * seconds: the audio duration, samples / 16000; audio_tokens: ceil(T/8); rtf = encode_s / seconds;
    peak_rss_mib_before / _after: ru_maxrss before features_s and after encode_s.
  The speech LoRA is not applied (lora_* tensors are dropped); it does not touch the encoder.

Notes: sliding_window (262144 in the hub config) is passed as None: it never triggers below 131072
tokens, and None keeps transformers on its plain causal-mask path. LoRA is not applied (text-only
mode of the original uses the base weights). Attention implementation: sdpa (the CPU default).
"""
import argparse
import json
import os
import re
import resource
import statistics
import struct
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
ST_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_config(hub):
    from transformers import Phi4MultimodalAudioConfig, Phi4MultimodalConfig, Phi4MultimodalVisionConfig

    if hub.get("model_type") != "phi4mm":
        log(f"warning: model_type is {hub.get('model_type')!r}, expected 'phi4mm'")
    rs = hub["rope_scaling"]
    rope_type = rs.get("type", rs.get("rope_type"))
    rope = {
        "rope_type": "longrope" if rope_type in ("longrope", "su", "yarn") else rope_type,
        "short_factor": rs["short_factor"],
        "long_factor": rs["long_factor"],
        "rope_theta": hub.get("rope_theta", 10000.0),
        "partial_rotary_factor": hub.get("partial_rotary_factor", 1.0),
    }
    ac = hub["audio_processor"]["config"]
    audio = Phi4MultimodalAudioConfig(
        hidden_size=ac["attention_dim"],
        intermediate_size=ac["linear_units"],
        num_blocks=ac["num_blocks"],
        num_attention_heads=ac["attention_heads"],
        activation=ac["activation"],
        chunk_size=ac["chunk_size"],
        left_chunk=ac["left_chunk"],
        dropout_rate=ac["dropout_rate"],
        ext_pw_out_channel=ac["ext_pw_out_channel"],
        depthwise_separable_out_channel=ac["depthwise_seperable_out_channel"],
        depthwise_multiplier=ac["depthwise_multiplier"],
        kernel_size=ac["kernel_size"],
        conv_activation=ac["conv_activation"],
        input_size=ac["input_size"],
        conv_glu_type=ac["conv_glu_type"],
        time_reduction=ac["time_reduction"],
        bias_max_distance=ac["relative_attention_bias_args"]["t5_bias_max_distance"],
        nemo_conv_channels=ac["nemo_conv_settings"]["conv_channels"],
        downsample_rate=hub["embd_layer"]["audio_embd_layer"].get("downsample_rate", 1),
    )
    vision = Phi4MultimodalVisionConfig(crop_size=hub["embd_layer"]["image_embd_layer"]["crop_size"])
    # The official config.json has no vision_config / audio_config. Reduced test checkpoints
    # (reference/make_tiny.py's fixtures/tiny) add them in native form; honour them when present.
    if isinstance(hub.get("vision_config"), dict):
        vision = Phi4MultimodalVisionConfig(**hub["vision_config"])
    if isinstance(hub.get("audio_config"), dict):
        audio = Phi4MultimodalAudioConfig(**hub["audio_config"])
    cfg = Phi4MultimodalConfig(
        vocab_size=hub["vocab_size"],
        hidden_size=hub["hidden_size"],
        intermediate_size=hub["intermediate_size"],
        num_hidden_layers=hub["num_hidden_layers"],
        num_attention_heads=hub["num_attention_heads"],
        num_key_value_heads=hub["num_key_value_heads"],
        hidden_act=hub["hidden_act"],
        max_position_embeddings=hub["max_position_embeddings"],
        original_max_position_embeddings=hub["original_max_position_embeddings"],
        rms_norm_eps=hub["rms_norm_eps"],
        tie_word_embeddings=hub.get("tie_word_embeddings", True),
        rope_parameters=rope,
        bos_token_id=hub.get("bos_token_id", 199999),
        pad_token_id=hub.get("pad_token_id", 199999),
        eos_token_id=[199999, 200020],
        sliding_window=None,
        vision_config=vision,
        audio_config=audio,
    )
    return cfg


# hub -> native renames (architecture.md §7), applied after stripping "base_layer."
_RENAMES = [
    (re.compile(r"\.image_embed\.glb_GN$"), ".image_embed.global_img_feature_extensor"),
    (re.compile(r"\.image_embed\.sub_GN$"), ".image_embed.sub_img_feature_extensor"),
    (re.compile(r"\.image_embed\.img_projection\.0\."), ".image_embed.img_projection_up."),
    (re.compile(r"\.image_embed\.img_projection\.2\."), ".image_embed.img_projection_down."),
    (re.compile(r"\.audio_embed\.audio_projection\.speech\.0\."), ".audio_embed.up_proj_for_speech."),
    (re.compile(r"\.audio_embed\.audio_projection\.speech\.2\."), ".audio_embed.down_proj_for_speech."),
    (re.compile(r"\.audio_embed\.audio_projection\.vision\.0\."), ".audio_embed.up_proj_for_vision_speech."),
    (re.compile(r"\.audio_embed\.audio_projection\.vision\.2\."), ".audio_embed.down_proj_for_vision_speech."),
    (re.compile(r"\.(feed_forward_(?:in|out))\.net\.0\.linear\."), r".\1.gate_up_proj."),
    (re.compile(r"\.(feed_forward_(?:in|out))\.net\.2\."), r".\1.down_proj."),
    (re.compile(r"\.self_attn\.linear_q\."), ".self_attn.q_proj."),
    (re.compile(r"\.self_attn\.linear_k\."), ".self_attn.k_proj."),
    (re.compile(r"\.self_attn\.linear_v\."), ".self_attn.v_proj."),
    (re.compile(r"\.self_attn\.linear_out\."), ".self_attn.o_proj."),
]


def hub_to_native(name):
    """Returns the native name, or None for tensors the native model does not hold (LoRA)."""
    if "lora_" in name:
        return None
    name = name.replace(".base_layer.", ".")
    for pat, rep in _RENAMES:
        name = pat.sub(rep, name)
    return name


def read_safetensors(path, want, dtype):
    """Yields (name, tensor) for names with want(name) true, reading with plain file I/O into fresh
    tensors (one copy, no mmap)."""
    with open(path, "rb", buffering=0) as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
        base = 8 + hlen
        items = [(k, v) for k, v in header.items() if k != "__metadata__" and want(k)]
        items.sort(key=lambda kv: kv[1]["data_offsets"][0])
        for k, v in items:
            src_dt = ST_DTYPES[v["dtype"]]
            s, e = v["data_offsets"]
            t = torch.empty(v["shape"], dtype=src_dt)
            mv = memoryview(t.view(-1).view(torch.uint8).numpy())
            assert len(mv) == e - s, (k, len(mv), e - s)
            f.seek(base + s)
            got = 0
            while got < len(mv):
                n = f.readinto(mv[got:])
                if not n:
                    raise IOError(f"short read in {path} for {k}")
                got += n
            if src_dt != dtype:
                t = t.to(dtype)
            yield k, t


def load_model(model_dir, dtype, decoder_only):
    from transformers import Phi4MultimodalForCausalLM
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalRotaryEmbedding

    with open(os.path.join(model_dir, "config.json")) as f:
        hub = json.load(f)
    cfg = build_config(hub)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Phi4MultimodalForCausalLM(cfg)
    model.eval()

    idx_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(idx_path):
        with open(idx_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]

    def want(k):
        if "lora_" in k:
            return False
        if decoder_only and k.startswith("model.embed_tokens_extend."):
            return False
        return True

    expected = dict(model.state_dict())
    n_loaded, n_params, n_skipped_lora = 0, 0, 0
    unexpected = []
    for sh in shards:
        t0 = time.time()
        sd = {}
        for k, t in read_safetensors(os.path.join(model_dir, sh), want, dtype):
            nk = hub_to_native(k)
            if nk not in expected:
                unexpected.append(k)
                continue
            if tuple(expected[nk].shape) != tuple(t.shape):
                raise ValueError(f"shape mismatch {k} -> {nk}: {tuple(t.shape)} vs {tuple(expected[nk].shape)}")
            sd[nk] = t
            n_params += t.numel()
        model.load_state_dict(sd, strict=False, assign=True)
        n_loaded += len(sd)
        log(f"  {sh}: {len(sd)} tensors in {time.time() - t0:.1f} s")
        del sd
    if unexpected:
        raise ValueError(f"{len(unexpected)} checkpoint tensors have no native home, e.g. {unexpected[:5]}")

    # tied head, fresh (non-persistent) rotary buffers
    model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = Phi4MultimodalRotaryEmbedding(config=cfg)
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    bad = [n for n in still_meta if not (decoder_only and n.startswith("model.embed_tokens_extend."))]
    if bad:
        raise ValueError(f"{len(bad)} tensors were not loaded, e.g. {bad[:5]}")
    log(f"loaded {n_loaded} tensors, {n_params / 1e9:.3f} B params as {dtype}"
        + (f" ({len(still_meta)} encoder tensors left on meta: --decoder-only)" if still_meta else ""))
    log(f"rotary: type {model.model.rotary_emb.rope_type}, attention_scaling {model.model.rotary_emb.attention_scaling:.10f}")
    return model, cfg


PROMPT = "<|user|><|image_1|>What is shown in this image?<|end|><|assistant|>"  # model card prompt


def bench_image(model, cfg, model_dir, path, dtype):
    """Image numbers (see the module docstring) on the loaded full model; returns the "image" object."""
    from transformers import DynamicCache, TokenizersBackend
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from PIL import Image
    import make_vision as mv  # the original (hub) processor's preprocessing, placeholder expansion, batching

    tt = time.perf_counter()
    tok = TokenizersBackend.from_pretrained(model_dir)
    log(f"image: tokenizer loaded in {time.perf_counter() - tt:.2f} s (not timed)")

    t0 = time.perf_counter()
    img = Image.open(path)
    img.load()
    t1 = time.perf_counter()
    pre = mv.preprocess(img)
    inputs = mv.batch([pre])
    t2 = time.perf_counter()
    ids = torch.tensor([mv.expand(tok, PROMPT, [pre["num_img_tokens"]])])
    t3 = time.perf_counter()
    preprocess_s = t3 - t0
    n_tok, crops = pre["num_img_tokens"], int(pre["pixel_values"].shape[0])
    (gw, gh), (nw, nh) = pre["grid"], pre["resized"]
    log(f"image {path}: {img.size[0]}x{img.size[1]} {img.mode}, grid {gw}x{gh} ({crops} crops incl. global), "
        f"resized {nw}x{nh}, {n_tok} image tokens, {ids.shape[1]} prompt tokens")
    log(f"preprocess {preprocess_s:.4f} s = decode {t1 - t0:.4f} + transform/batch {t2 - t1:.4f} "
        f"+ tokenize/expand {t3 - t2:.4f}")

    ie = model.model.embed_tokens_extend.image_embed
    attn = ie.img_processor.config._attn_implementation
    if attn == "sdpa" and bool(inputs["image_attention_mask"].bool().all()):
        log("warning: no crop of this image is padded, so transformers' sdpa SigLIP runs CAUSAL attention "
            "(its bug; values wrong, time about the same)")
    placeholders = torch.full((1, n_tok), mv.IMAGE_ID)
    blank = torch.zeros(1, n_tok, cfg.hidden_size, dtype=dtype)
    enc = []
    with torch.inference_mode():
        for _ in range(2):
            te = time.perf_counter()
            feats = ie(placeholders, blank, **inputs)
            enc.append(time.perf_counter() - te)
        assert feats.shape == (1, n_tok, cfg.hidden_size), feats.shape
        del feats
        log(f"image encode ({attn} attention), 2 runs (s): " + " ".join(f"{t:.4f}" for t in enc))

        cache = DynamicCache(config=cfg)
        tf = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **inputs)
        first = int(out.logits[0, -1].argmax())
        fwd_s = time.perf_counter() - tf
        del cache, out
    log(f"image prompt forward (encode + prefill {ids.shape[1]} tokens) + argmax: {fwd_s:.4f} s, "
        f"first token {first}; ttft = preprocess + forward = {preprocess_s + fwd_s:.4f} s")
    return {
        "image": str(path),
        "crops": crops,
        "image_tokens": n_tok,
        "prompt_tokens": int(ids.shape[1]),
        "preprocess_s": round(preprocess_s, 4),
        "image_encode_s": round(statistics.median(enc), 4),
        "ttft_s": round(preprocess_s + fwd_s, 4),
    }


def check_audio(path):
    """Returns an error message unless PATH is a readable 16 kHz WAV file (else None)."""
    if not os.path.isfile(path):
        return f"no such file: {path}"
    import soundfile as sf
    try:
        info = sf.info(path)
    except Exception as e:  # noqa: BLE001  (libsndfile's message says what is wrong)
        return f"cannot read {path}: {e}"
    what = f"{path} is {info.format} at {info.samplerate} Hz ({info.channels} ch); a 16 kHz WAV file is expected"
    if info.samplerate != 16000:
        return (what + " (the original extractor decimates / fill-zeroes other rates, so its features and token "
                "count would not be comparable with phi4mm's)")
    if info.format != "WAV":
        return what
    return None


def bench_audio(model, cfg, path, dtype):
    """Audio numbers (see the module docstring) on the loaded full model; returns the "audio" object."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_audio as ma  # the original (hub) feature extractor (numpy), token count, soundfile loader

    rss = lambda: round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    rss_before = rss()
    t0 = time.perf_counter()
    wav, fs = ma.load_audio(path)
    t1 = time.perf_counter()
    feats, signal, ffs = ma.original_features(wav, fs)
    t2 = time.perf_counter()
    features_s = t2 - t0
    assert fs == ffs == 16000, (fs, ffs)
    seconds = len(signal) / 16000
    n_frames = int(feats.shape[0])
    n_tok = ma.num_tokens(n_frames)
    log(f"audio {path}: {len(wav)} samples at {fs} Hz ({seconds:.3f} s, {1 if wav.ndim == 1 else wav.shape[1]} ch), "
        f"T = {n_frames} frames, {n_tok} audio tokens")
    log(f"features {features_s:.4f} s = read {t1 - t0:.4f} + original extractor {t2 - t1:.4f}")

    ae = model.model.embed_tokens_extend.audio_embed
    attn = ae.encoder.config._attn_implementation
    x = torch.from_numpy(feats)[None]                                   # [1, T, 80] f32; audio_embed casts to dtype
    placeholders = torch.full((1, n_tok), cfg.audio_config.audio_token_id)
    blank = torch.zeros(1, n_tok, cfg.hidden_size, dtype=dtype)
    with torch.inference_mode():
        te = time.perf_counter()
        out = ae(placeholders, blank, audio_input_features=x, audio_embed_sizes=torch.tensor([n_tok]),
                 audio_attention_mask=None, audio_projection_mode="speech")
        encode_s = time.perf_counter() - te
    assert out.shape == (1, n_tok, cfg.hidden_size), out.shape
    del out
    log(f"audio encode (Conformer, {attn} attention, + speech projector), 1 run: {encode_s:.4f} s, "
        f"real-time factor {encode_s / seconds:.4f}")
    return {
        "audio": str(path),
        "seconds": seconds,
        "audio_tokens": n_tok,
        "features_s": round(features_s, 4),
        "encode_s": round(encode_s, 4),
        "rtf": round(encode_s / seconds, 6),
        "peak_rss_mib_before": rss_before,
        "peak_rss_mib_after": rss(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--decoder-only", action="store_true",
                    help="do not read the vision/audio encoder weights (text-only runs never use them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image", metavar="PATH",
                    help="also time this image: preprocessing, image encoder, time to first token (see above)")
    ap.add_argument("--audio", metavar="PATH",
                    help="also time this 16 kHz WAV: original features, speech encoder + projector (see above)")
    args = ap.parse_args()
    if args.audio and args.decoder_only:
        ap.error("--audio needs the audio encoder: it cannot be combined with --decoder-only")
    if args.audio:
        err = check_audio(args.audio)
        if err:
            ap.error(f"--audio: {err}")
    if args.image and args.decoder_only:
        ap.error("--image needs the vision encoder: it cannot be combined with --decoder-only")
    if args.image and not os.path.isfile(args.image):
        ap.error(f"--image: no such file: {args.image}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    from transformers import DynamicCache

    t0 = time.time()
    model, cfg = load_model(args.model_dir, dtype, args.decoder_only)
    load_s = time.time() - t0
    log(f"load: {load_s:.1f} s, rss so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, 199998, (1, args.prompt_tokens), generator=g)

    def step(ids, cache, keep=1):
        return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=keep)

    with torch.inference_mode():
        # warm-up: touches all decoder weights once
        tw = time.time()
        cache = DynamicCache(config=cfg)
        out = step(prompt[:, :8], cache)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step(nxt, cache)
        log(f"warm-up (8-token prefill + 1 step): {time.time() - tw:.2f} s")
        del cache, out

        cache = DynamicCache(config=cfg)
        tp = time.time()
        out = step(prompt, cache)
        prefill_s = time.time() - tp
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times, toks = [], [int(nxt)]
        for _ in range(args.gen_tokens):
            ts = time.time()
            out = step(nxt, cache)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.time() - ts)
            toks.append(int(nxt))
    log(f"prefill {args.prompt_tokens} tokens: {prefill_s:.2f} s; decode steps (s): "
        + " ".join(f"{t:.3f}" for t in times))
    log(f"greedy tokens: {toks}")
    image = bench_image(model, cfg, args.model_dir, args.image, dtype) if args.image else None
    audio = bench_audio(model, cfg, args.audio, dtype) if args.audio else None
    med = statistics.median(times) if times else float("nan")
    res = {
        "engine": "transformers",
        "dtype": args.dtype,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "prefill_tok_s": round(args.prompt_tokens / prefill_s, 3),
        "decode_tok_s": round(1.0 / med, 3) if times else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_s": round(load_s, 2),
        "image": image,
        "audio": audio,
    }
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
