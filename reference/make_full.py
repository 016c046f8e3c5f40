#!/usr/bin/env python3
"""Write a FULL-SIZE random-weight Phi-4-multimodal-instruct checkpoint in the official hub layout.

    python reference/make_full.py OUT_DIR [--seed 0] [--threads 2] [--dry-run]

Produces in OUT_DIR (never inside the repo: ~11.15 GB):
  * model-0000{1,2,3}-of-00003.safetensors  -- every tensor of design/architecture.md §7, bf16,
    hub key names (decoder `base_layer` + `lora_{A,B}.{vision,speech}`, SigLIP incl. the unused
    head/post_layernorm, glb_GN/sub_GN, img_projection.{0,2}, Conformer, both audio projections;
    no lm_head). Sharded greedily in module order at 5e9 bytes (like huggingface_hub's
    max_shard_size="5GB"): shard 1 ~5.0 GB, shard 2 ~5.0 GB, shard 3 the rest (~1.2 GB).
    Inside a shard tensors are sorted by name, as the safetensors library writes them;
    header metadata {"format": "pt"}.
  * model.safetensors.index.json  -- {"metadata": {"total_size": N}, "weight_map": {...}}
  * config.json  -- the hub's config.json (model_type phi4mm, all values of architecture.md §1.2)
  * tokenizer.json (built here, see build_tokenizer), vocab.json, merges.txt, and copies of the
    small files of ../shared/phi4mm-files/Phi-4-multimodal-instruct/ (beside the repository; PHI4MM_FILES overrides).

Values: N(0, 0.02) for weights/biases/LoRA, 1 + N(0, 0.02) for norm scales and
Conformer global_invstd, N(0, 0.02) for global_mean. Each tensor gets its own generator seeded from
(seed, crc32(name)), so the contents are reproducible and independent of sharding.

Streaming: one shard at a time, each tensor generated in chunks of <= 16 Mi elements and written
straight to the file (safetensors written by hand: u64 header length + JSON header + raw bytes), so
peak memory stays ~100 MB whatever the tensor size.
"""
import argparse
import json
import os
import resource
import shutil
import struct
import sys
import time
import zlib

import torch

_SHARED = os.environ.get("PHI4MM_FILES", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "phi4mm-files"))
SMALL_FILES_DIR = os.path.join(_SHARED, "Phi-4-multimodal-instruct")
O200K_TOKENIZER = os.path.join(_SHARED, "o200k", "gpt-4o-tokenizer.json")

SHARD_MAX_BYTES = 5_000_000_000  # huggingface_hub "5GB"
N_SHARDS = 3
CHUNK = 16 * 1024 * 1024  # elements per generation chunk

# ----------------------------------------------------------------------------------------------
# config.json (hub)
# ----------------------------------------------------------------------------------------------
LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]
assert len(LONG_FACTOR) == 48


def hub_config():
    """The official config.json content.

    Taken from the copies behind architecture.md §1.2 (TensorRT-LLM's test copy with its layer
    counts restored to 32 / 24, plus the vision_lora / speech_lora blocks with the hub's `layer`
    regexes). Written with indent=2 and sorted keys as transformers' save_pretrained does. This
    key set serializes to 4631 bytes, which matches the hub listing's 4.63 kB (the
    `_attn_implementation: flash_attention_2` entry of the TRT copy is needed for that size; an
    `img_processor: null` entry is not present).
    """
    return {
        "_attn_implementation": "flash_attention_2",
        "_name_or_path": "Phi-4-multimodal-instruct",
        "architectures": ["Phi4MMForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "audio_processor": {
            "config": {
                "activation": "swish",
                "activation_checkpointing": {"interval": 1, "module": "transformer", "offload": False},
                "attention_dim": 1024,
                "attention_heads": 16,
                "batch_norm": False,
                "bias_in_glu": True,
                "causal": True,
                "chunk_size": -1,
                "cnn_layer_norm": True,
                "conv_activation": "swish",
                "conv_glu_type": "swish",
                "depthwise_multiplier": 1,
                "depthwise_seperable_out_channel": 1024,
                "dropout_rate": 0.0,
                "encoder_embedding_config": {"input_size": 80},
                "ext_pw_kernel_size": 1,
                "ext_pw_out_channel": 1024,
                "input_layer": "nemo_conv",
                "input_size": 80,
                "kernel_size": 3,
                "left_chunk": 18,
                "linear_units": 1536,
                "nemo_conv_settings": {"conv_channels": 1024},
                "num_blocks": 24,
                "relative_attention_bias_args": {"t5_bias_max_distance": 500, "type": "t5"},
                "time_reduction": 8,
            },
            "name": "cascades",
        },
        "auto_map": {
            "AutoConfig": "configuration_phi4mm.Phi4MMConfig",
            "AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM",
            "AutoTokenizer": "Xenova/gpt-4o",
        },
        "bos_token_id": 199999,
        "embd_layer": {
            "audio_embd_layer": {
                "compression_rate": 8,
                "downsample_rate": 1,
                "embedding_cls": "audio",
                "enable_gradient_checkpointing": True,
                "projection_cls": "mlp",
                "use_conv_downsample": False,
                "use_qformer": False,
            },
            "embedding_cls": "image_audio",
            "image_embd_layer": {
                "crop_size": 448,
                "embedding_cls": "tune_image",
                "enable_gradient_checkpointing": True,
                "hd_transform_order": "sub_glb",
                "image_token_compression_cls": "avg_pool_2d",
                "projection_cls": "mlp",
                "use_hd_transform": True,
                "with_learnable_separator": True,
            },
        },
        "embd_pdrop": 0.0,
        "eos_token_id": 199999,
        "full_attn_mod": 1,
        "hidden_act": "silu",
        "hidden_size": 3072,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "interpolate_factor": 1,
        "lm_head_bias": False,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "phi4mm",
        "num_attention_heads": 24,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "original_max_position_embeddings": 4096,
        "pad_token_id": 199999,
        "partial_rotary_factor": 0.75,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "long_factor": LONG_FACTOR,
            "short_factor": [1.0] * 48,
            "type": "longrope",
        },
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "speech_lora": {
            "dp": 0.01,
            "layer": "((layers.*self_attn\\.(qkv|o)_proj)|(layers.*mlp\\.(gate_up|down)_proj))",
            "lora_alpha": 640,
            "r": 320,
        },
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.1",
        "use_cache": True,
        "vision_lora": {
            "dp": 0.0,
            "layer": "layers.*((self_attn\\.(qkv_proj|o_proj))|(mlp\\.(gate_up|down)_proj))",
            "lora_alpha": 512,
            "r": 256,
        },
        "vocab_size": 200064,
    }


# ----------------------------------------------------------------------------------------------
# tensor list (module order of the original Phi4MMForCausalLM: embed_tokens, embed_tokens_extend
# (image, audio), layers, norm)
# ----------------------------------------------------------------------------------------------
def tensor_specs(cfg):
    """Returns [(name, shape, kind)] in module (state_dict) order. kind: 'w' N(0,0.02), 'one' 1+N(0,0.02)."""
    H = cfg["hidden_size"]
    L = cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = H // nh
    I = cfg["intermediate_size"]
    V = cfg["vocab_size"]
    r_v, r_s = cfg["vision_lora"]["r"], cfg["speech_lora"]["r"]
    out = []

    def add(name, shape, kind="w"):
        out.append((name, tuple(shape), kind))

    add("model.embed_tokens.weight", [V, H])

    # ---- vision (SigLIP so400m-patch14-448 + HD transform + projector) ----
    vp = "model.embed_tokens_extend.image_embed."
    D, F, NL = 1152, 4304, 27
    add(vp + "glb_GN", [1, 1, D])
    add(vp + "sub_GN", [1, 1, 1, D])
    ip = vp + "img_processor."
    add(ip + "embeddings.patch_embedding.weight", [D, 3, 14, 14])
    add(ip + "embeddings.patch_embedding.bias", [D])
    add(ip + "embeddings.position_embedding.weight", [1024, D])
    for l in range(NL):
        p = f"{ip}encoder.layers.{l}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            add(p + f"self_attn.{proj}.weight", [D, D])
            add(p + f"self_attn.{proj}.bias", [D])
        add(p + "layer_norm1.weight", [D], "one")
        add(p + "layer_norm1.bias", [D])
        add(p + "mlp.fc1.weight", [F, D])
        add(p + "mlp.fc1.bias", [F])
        add(p + "mlp.fc2.weight", [D, F])
        add(p + "mlp.fc2.bias", [D])
        add(p + "layer_norm2.weight", [D], "one")
        add(p + "layer_norm2.bias", [D])
    add(ip + "post_layernorm.weight", [D], "one")
    add(ip + "post_layernorm.bias", [D])
    add(ip + "head.probe", [1, 1, D])
    add(ip + "head.attention.in_proj_weight", [3 * D, D])
    add(ip + "head.attention.in_proj_bias", [3 * D])
    add(ip + "head.attention.out_proj.weight", [D, D])
    add(ip + "head.attention.out_proj.bias", [D])
    add(ip + "head.layernorm.weight", [D], "one")
    add(ip + "head.layernorm.bias", [D])
    add(ip + "head.mlp.fc1.weight", [F, D])
    add(ip + "head.mlp.fc1.bias", [F])
    add(ip + "head.mlp.fc2.weight", [D, F])
    add(ip + "head.mlp.fc2.bias", [D])
    add(vp + "img_projection.0.weight", [H, D])
    add(vp + "img_projection.0.bias", [H])
    add(vp + "img_projection.2.weight", [H, H])
    add(vp + "img_projection.2.bias", [H])

    # ---- audio (cascades Conformer + projections) ----
    ac = cfg["audio_processor"]["config"]
    A = ac["attention_dim"]
    C = ac["nemo_conv_settings"]["conv_channels"]
    U = ac["linear_units"]
    nb = ac["num_blocks"]
    heads_a = ac["attention_heads"]
    mel = ac["input_size"]
    ap = "model.embed_tokens_extend.audio_embed."
    ep = ap + "encoder."
    add(ep + "encoder_embedding.global_mean", [mel])
    add(ep + "encoder_embedding.global_invstd", [mel], "one")
    add(ep + "embed.conv.0.weight", [C, 1, 3, 3])
    add(ep + "embed.conv.0.bias", [C])
    for dw, pw in ((2, 3), (5, 6)):
        add(ep + f"embed.conv.{dw}.weight", [C, 1, 3, 3])
        add(ep + f"embed.conv.{dw}.bias", [C])
        add(ep + f"embed.conv.{pw}.weight", [C, C, 1, 1])
        add(ep + f"embed.conv.{pw}.bias", [C])
    sub_mel = mel // ac["time_reduction"]  # 80 / 8 = 10 after three stride-2 stages
    add(ep + "embed.out.weight", [A, C * sub_mel])
    add(ep + "embed.out.bias", [A])
    add(ep + "relative_attention_bias_layer.bias_values.weight",
        [2 * ac["relative_attention_bias_args"]["t5_bias_max_distance"], heads_a])
    for b in range(nb):
        p = f"{ep}encoders.{b}."
        for ff in ("feed_forward_in", "feed_forward_out"):
            add(p + f"{ff}.layer_norm.weight", [A], "one")
            add(p + f"{ff}.layer_norm.bias", [A])
            add(p + f"{ff}.net.0.linear.weight", [2 * U, A])
            add(p + f"{ff}.net.0.linear.bias", [2 * U])
            add(p + f"{ff}.net.2.weight", [A, U])
            add(p + f"{ff}.net.2.bias", [A])
        for proj in ("linear_q", "linear_k", "linear_v", "linear_out"):
            add(p + f"self_attn.{proj}.weight", [A, A])
            add(p + f"self_attn.{proj}.bias", [A])
        add(p + "conv.layer_norm.weight", [A], "one")
        add(p + "conv.layer_norm.bias", [A])
        add(p + "conv.glu.b1", [1, A, 1])
        add(p + "conv.glu.b2", [1, A, 1])
        add(p + "conv.glu.ext_pw_conv_1d.weight", [2 * A, A, 1])
        add(p + "conv.glu.ext_pw_conv_1d.bias", [2 * A])
        add(p + "conv.dw_sep_conv_1d.dw_conv.weight", [A, 1, 3])
        add(p + "conv.dw_sep_conv_1d.dw_conv.bias", [A])
        add(p + "conv.dw_sep_conv_1d.pw_conv.weight", [A, A, 1])
        add(p + "conv.dw_sep_conv_1d.pw_conv.bias", [A])
        add(p + "conv.ext_pw_conv_1d.weight", [A, A, 1])
        add(p + "conv.ext_pw_conv_1d.bias", [A])
        add(p + "layer_norm_att.weight", [A], "one")
        add(p + "layer_norm_att.bias", [A])
        add(p + "layer_norm.weight", [A], "one")
        add(p + "layer_norm.bias", [A])
    for mode in ("speech", "vision"):
        add(ap + f"audio_projection.{mode}.0.weight", [H, A])
        add(ap + f"audio_projection.{mode}.0.bias", [H])
        add(ap + f"audio_projection.{mode}.2.weight", [H, H])
        add(ap + f"audio_projection.{mode}.2.bias", [H])

    # ---- decoder layers ----
    qkv_out = (nh + 2 * nkv) * hd
    mods = [
        ("self_attn.qkv_proj", qkv_out, H),
        ("self_attn.o_proj", H, nh * hd),
        ("mlp.gate_up_proj", 2 * I, H),
        ("mlp.down_proj", H, I),
    ]
    for i in range(L):
        p = f"model.layers.{i}."
        for m, o, inp in mods:
            add(p + f"{m}.base_layer.weight", [o, inp])
            for ad, r in (("vision", r_v), ("speech", r_s)):
                add(p + f"{m}.lora_A.{ad}.weight", [r, inp])
                add(p + f"{m}.lora_B.{ad}.weight", [o, r])
        add(p + "input_layernorm.weight", [H], "one")
        add(p + "post_attention_layernorm.weight", [H], "one")
    add("model.norm.weight", [H], "one")
    return out


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def plan_shards(specs):
    """Greedy split in module order, max 5e9 bytes a shard (huggingface_hub semantics)."""
    shards, cur, cur_bytes = [], [], 0
    for name, shape, kind in specs:
        nbytes = numel(shape) * 2
        if cur and cur_bytes + nbytes > SHARD_MAX_BYTES:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape, kind))
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


def write_shard(path, entries, seed, log_every_bytes=1 << 30):
    entries = sorted(entries, key=lambda e: e[0])
    header = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, _ in entries:
        nb = numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    buf = torch.empty(CHUNK, dtype=torch.bfloat16)
    written, next_log, t0 = 0, log_every_bytes, time.time()
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for name, shape, kind in entries:
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & ((1 << 63) - 1))
            n = numel(shape)
            done = 0
            while done < n:
                k = min(CHUNK, n - done)
                x = buf[:k]
                if kind == "one":
                    x.normal_(1.0, 0.02, generator=g)
                else:
                    x.normal_(0.0, 0.02, generator=g)
                f.write(x.view(torch.int16).numpy().data)
                done += k
                written += 2 * k
                if written >= next_log:
                    el = time.time() - t0
                    print(f"    {written / 1e9:6.2f} / {off / 1e9:.2f} GB  ({written / 1e6 / max(el, 1e-9):.0f} MB/s)",
                          flush=True)
                    next_log += log_every_bytes
    os.replace(path + ".tmp", path)
    return off


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def build_tokenizer(out_dir):
    """tokenizer.json = o200k_base vocabulary (Xenova/gpt-4o `tokenizers` file) + the added tokens of
    Phi-4-multimodal's tokenizer_config.json `added_tokens_decoder` (ids and flags kept).
    Also writes GPT-2-style vocab.json / merges.txt derived from the same data (the hub has them too).
    Each added token is also put into model.vocab at its id (see below).
    """
    from tokenizers import Tokenizer

    with open(O200K_TOKENIZER, encoding="utf-8") as f:
        tj = json.load(f)
    with open(os.path.join(SMALL_FILES_DIR, "tokenizer_config.json"), encoding="utf-8") as f:
        tc = json.load(f)
    added = []
    for sid, t in sorted(tc["added_tokens_decoder"].items(), key=lambda kv: int(kv[0])):
        added.append({
            "id": int(sid),
            "content": t["content"],
            "single_word": t["single_word"],
            "lstrip": t["lstrip"],
            "rstrip": t["rstrip"],
            "normalized": t["normalized"],
            "special": t["special"],
        })
    tj["added_tokens"] = added
    # The `tokenizers` library gives an added token the id the model vocab has for it, else the next
    # free id; the o200k file therefore lists <|endoftext|> / <|endofprompt|> in model.vocab with
    # their ids. Do the same for every added token so the non-contiguous ids survive.
    vocab = tj["model"]["vocab"]
    for a in added:
        assert vocab.get(a["content"], a["id"]) == a["id"]
        vocab[a["content"]] = a["id"]
    tok = Tokenizer.from_str(json.dumps(tj, ensure_ascii=False))
    # sanity: ids kept, specials atomic
    for a in added:
        got = tok.token_to_id(a["content"])
        assert got == a["id"], (a, got)
    ids = tok.encode("<|user|>Hello world<|end|><|assistant|>", add_special_tokens=False).ids
    assert ids[0] == 200021 and ids[-2:] == [200020, 200019], ids
    tok.save(os.path.join(out_dir, "tokenizer.json"))

    # GPT-2 slow-tokenizer files
    model = tj["model"]
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in model["merges"]:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    return tok.get_vocab_size(with_added_tokens=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="print the plan, write config/tokenizer only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    out = os.path.abspath(args.out_dir)
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    if out == repo or out.startswith(repo + os.sep):
        sys.exit("refusing to write the ~11 GB checkpoint inside the repository")
    os.makedirs(out, exist_ok=True)
    t_start = time.time()

    cfg = hub_config()
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for fn in sorted(os.listdir(SMALL_FILES_DIR)):
        if fn.endswith(".json"):
            shutil.copyfile(os.path.join(SMALL_FILES_DIR, fn), os.path.join(out, fn))
    nvocab = build_tokenizer(out)
    print(f"config.json, tokenizer.json ({nvocab} tokens incl. added), vocab.json, merges.txt and small json files written")

    specs = tensor_specs(cfg)
    names = [s[0] for s in specs]
    assert len(set(names)) == len(names)
    total_params = sum(numel(s[1]) for s in specs)
    shards = plan_shards(specs)
    assert len(shards) == N_SHARDS, f"expected {N_SHARDS} shards, got {len(shards)}"
    fnames = [f"model-{i + 1:05d}-of-{N_SHARDS:05d}.safetensors" for i in range(N_SHARDS)]

    groups = {
        "decoder base": lambda n: n.startswith("model.layers.") and "lora_" not in n or n in ("model.embed_tokens.weight", "model.norm.weight"),
        "decoder lora vision": lambda n: ".vision.weight" in n and n.startswith("model.layers."),
        "decoder lora speech": lambda n: ".speech.weight" in n and n.startswith("model.layers."),
        "vision tower+proj": lambda n: ".image_embed." in n,
        "audio encoder+proj": lambda n: ".audio_embed." in n,
    }
    for g, fn in groups.items():
        print(f"  {g:22s} {sum(numel(s[1]) for s in specs if fn(s[0])) / 1e6:10.1f} M params")
    print(f"tensors: {len(specs)}  params: {total_params:,} ({total_params / 1e9:.3f} B)  bytes: {2 * total_params:,}")
    for fn, sh in zip(fnames, shards):
        print(f"  {fn}: {len(sh)} tensors, {sum(numel(s[1]) for s in sh) * 2 / 1e9:.3f} GB")

    weight_map = {}
    for fn, sh in zip(fnames, shards):
        for name, _, _ in sh:
            weight_map[name] = fn
    index = {"metadata": {"total_size": 2 * total_params},
             "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}

    if args.dry_run:
        return
    total_bytes = 0
    for fn, sh in zip(fnames, shards):
        t0 = time.time()
        print(f"writing {fn} ...", flush=True)
        nb = write_shard(os.path.join(out, fn), sh, args.seed)
        total_bytes += os.path.getsize(os.path.join(out, fn))
        print(f"  done {fn}: {nb / 1e9:.3f} GB data in {time.time() - t0:.1f} s", flush=True)
    with open(os.path.join(out, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"TOTAL params {total_params:,} ({total_params / 1e9:.3f} B); tensor bytes {2 * total_params:,} "
          f"({2 * total_params / 1e9:.3f} GB); files {total_bytes:,} bytes; "
          f"{time.time() - t_start:.1f} s; peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
